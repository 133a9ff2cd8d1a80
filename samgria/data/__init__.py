"""Tasks and task samplers for meta-learning."""

from samgria.data.task import Task, TaskSampler

__all__ = ["Task", "TaskSampler"]
