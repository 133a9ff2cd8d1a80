"""Task samplers: sinusoid regression and N-way K-shot classification from any tensor data set."""

import torch

from samgria import FewShotSampler, SinusoidTaskSampler, Task, TaskSampler

# Sinusoid regression (Finn et al., 2017): y = A sin(x - phase), shapes (K, 1).
sampler = SinusoidTaskSampler(amp_range=(0.1, 5.0), phase_range=(0.0, torch.pi), k_support=10, k_query=15, seed=0)
tasks = sampler.sample(3)
assert isinstance(sampler, TaskSampler) and isinstance(tasks[0], Task)
assert tasks[0].support_x.shape == (10, 1) and tasks[0].query_y.shape == (15, 1)
again = SinusoidTaskSampler(k_support=10, k_query=15, seed=0).sample(3)
assert torch.equal(tasks[2].query_y, again[2].query_y)  # the seed makes sampling reproducible

tasks, amplitudes, phases = sampler.sample_with_params(2)  # e.g. to plot the true curves
torch.testing.assert_close(tasks[0].support_y, amplitudes[0] * torch.sin(tasks[0].support_x - phases[0]))

# N-way K-shot classification from labelled tensors: 10 classes of 2-D Gaussian blobs.
generator = torch.Generator().manual_seed(0)
labels = torch.arange(10).repeat_interleave(30)
inputs = torch.randn(300, 2, generator=generator) + 3.0 * labels[:, None].float()
few_shot = FewShotSampler(inputs, labels, n_way=5, k_shot=1, k_query=5, seed=0)
task = few_shot.sample(1)[0]
assert task.support_x.shape == (5, 2) and task.query_x.shape == (25, 2)
assert sorted(task.support_y.tolist()) == [0, 1, 2, 3, 4]  # labels remapped per task

# Only training classes (a class split), and the original labels of each task.
train_sampler = FewShotSampler(inputs, labels, n_way=5, k_shot=1, k_query=5, classes=range(7), seed=0)
tasks, original_classes = train_sampler.sample_with_classes(4)
assert original_classes.shape == (4, 5) and int(original_classes.max()) < 7
