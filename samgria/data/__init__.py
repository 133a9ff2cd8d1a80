"""Tasks and task samplers for meta-learning."""

from samgria.data.few_shot import FewShotSampler
from samgria.data.sharding import DistributedTaskSampler
from samgria.data.sinusoid import SinusoidTaskSampler, sinusoid
from samgria.data.task import Task, TaskSampler

__all__ = ["DistributedTaskSampler", "FewShotSampler", "SinusoidTaskSampler", "Task", "TaskSampler", "sinusoid"]
