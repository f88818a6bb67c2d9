"""The flow sampling rule (Flux, SD3.x: rectified flow, CONST sampling on the model's own sigmas): ``invert``,
``extract``, ``edit`` and their ``samplers``; the DDPM rule's room (``ddpm/``) has the same files."""
