"""Generation-based evaluation: benchmark files in, per-sample results, a summary and a report out.

- `keye.eval.benchmark`: reading benchmarks: JSONL (question, media, answer, task, metric) and
  VLMEvalKit-style TSV (base64 images); media through `keye.data.sources.read_media_file`.
- `keye.eval.extract`: the answer in a reply, per metric (``<answer>``, ``\\boxed{}``, choice letters,
  numbers, boxes), and whether the reply thought.
- `keye.eval.metrics`: exact and relaxed accuracy, multiple choice, ANLS (OCR), IoU (grounding).
- `keye.eval.report`: ``summary.json`` (per task and overall) and ``report.md`` (table and plot).
- `keye.eval.run`: the loop: prompts → generator → extracted answers → scores, ``results.jsonl`` written
  line by line so a run that dies keeps what it computed; bad samples skipped and counted.
- `keye.eval.model`: the model to evaluate, from a released-format folder or a finished stage of a run.

``keye-launch eval`` (`keye.launch.evaluate`) and the ``eval`` stage (``keye_plugins.stage.eval``) both call
`keye.eval.run.evaluate`.
"""
