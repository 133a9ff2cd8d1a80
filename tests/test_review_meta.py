"""Regression tests from a review of the meta-learning half: each pins one fixed defect."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samgria import ANIL, MAML, MetaSGD, MetaTrainer, Reptile, SinusoidTaskSampler


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def _tasks(n=3):
    return SinusoidTaskSampler(k_support=5, k_query=5, seed=0, dtype=torch.float64).sample(n)


@pytest.mark.parametrize("cls", [MAML, MetaSGD])
def test_state_dict_hooks_registered_on_meta_optimizer_run(cls):
    meta = cls(_mlp(), torch.optim.SGD, lr=0.1)
    fired = []
    meta.register_state_dict_pre_hook(lambda opt: fired.append("pre"))
    meta.register_state_dict_post_hook(lambda opt, sd: fired.append("post"))
    meta.register_load_state_dict_pre_hook(lambda opt, sd: fired.append("load_pre"))
    meta.register_load_state_dict_post_hook(lambda opt: fired.append("load_post"))
    meta.load_state_dict(meta.state_dict())
    assert fired == ["pre", "post", "load_pre", "load_post"]


@pytest.mark.parametrize("make", ["adapt_false_groups", "anil_frozen_head", "reptile"])
def test_nothing_to_adapt_is_consistent_between_loop_and_vmap(make):
    model = _mlp()
    if make == "adapt_false_groups":
        meta = MAML(model, torch.optim.SGD, lr=0.1, params=[{"params": model.parameters(), "adapt": False}])
    elif make == "anil_frozen_head":
        for p in model[2].parameters():
            p.requires_grad_(False)
        meta = ANIL(model, torch.optim.SGD, lr=0.1, head=model[2])
    else:
        meta = Reptile(model, torch.optim.SGD, lr=0.1)
        meta.param_groups[0]["adapt"] = False
    tasks = _tasks()
    vmapped = meta.task_losses(tasks, F.mse_loss, vectorize=True)  # works: zero-step adaptation
    looped = meta.task_losses(tasks, F.mse_loss, vectorize=False)  # RuntimeError deep in autograd.grad
    torch.testing.assert_close(looped, vmapped)


def test_early_stopped_fit_still_evaluates_eval_tasks_once_at_the_end():
    meta = MAML(_mlp(), torch.optim.SGD, lr=0.01)
    sampler = SinusoidTaskSampler(k_support=5, k_query=5, seed=1, dtype=torch.float64)
    history = MetaTrainer(meta, F.mse_loss, sampler).fit(
        5, 2, eval_tasks=_tasks(2), callback=lambda i, loss: i == 2, progress=False
    )
    assert len(history.meta_loss) == 2
    assert history.eval_iterations == [2] and len(history.eval_loss) == 1


def test_metasgd_add_param_group_gives_new_parameters_learnable_rates():
    model = _mlp()
    meta = MetaSGD(model, torch.optim.SGD, lr=0.1, params=[{"params": model[2].parameters()}])
    meta.add_param_group({"params": model[0].parameters(), "inner_lr": 0.05})
    assert set(meta.inner_lrs) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    _, lrs = meta._adapt_config()
    assert all(isinstance(v, torch.Tensor) and v.requires_grad for v in lrs.values())
    torch.testing.assert_close(meta.inner_lrs["0.weight"], torch.full_like(model[0].weight, 0.05))
