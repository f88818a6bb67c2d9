"""The temporal-consistency metric the TokenFlow paper reports (warp error), in one wing, without ComfyUI.

- :mod:`.warp_error`       the warp error of frame pairs given source flows (occlusion and out-of-frame masks)
- :mod:`.flow_estimation`  optical flow of the source video (OpenCV DIS, or a locally cached RAFT)
- :mod:`.consistency`      the frame checks, the per-pair loop and the chart the node shows

``nodes/consistency_nodes.py`` (the TokenFlow Temporal Consistency node) and ``scripts/consistency_report.py``
(a table for several edits) are thin users of these modules.
"""
