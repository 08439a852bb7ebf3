"""seqio task registrations. Each module registers tasks when imported; name it
with `--task_module=tasks.NAME` (or a path to any .py file) or in gin
(`DataConfig.task_modules`). See README "Add a task"."""
