"""The DDPM sampling rule (SD1.x, SD2.x, SDXL UNets: discrete schedule, eps or v prediction): ``invert``,
``extract``, ``edit`` and their ``samplers``; the flow rule's room (``flow/``) has the same files."""
