"""Evaluation: COCO caption metrics, VQAv2 answer scoring, grounding baselines and the report
(``phivlm eval``)."""
