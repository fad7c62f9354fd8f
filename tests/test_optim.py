"""The learning rate as a function of the step, SGD's weight-decay groups, and its update
compiled as one graph against torch's."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from torch._dynamo.testing import CompileCounterWithBackend

from fasttt.optim import lr_at, lr_schedule, make_optimizer, peak_lr, sgd_in_graph, step_optimizer
from fasttt.recipe import OptimConfig, ScheduleConfig


def test_step_schedule_with_warmup_never_overshoots():
    optim, schedule = OptimConfig(lr=0.1), ScheduleConfig(epochs=10, milestones=(4, 8),
                                                          factor=0.1, warmup_epochs=0.5)
    lrs = [lr_at(step, 3, optim, schedule) for step in range(30)]
    assert lrs[0] == pytest.approx(0.1 / 1.5) and max(lrs) == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.1)  # warm-up over, not above the peak
    assert lrs[11] == pytest.approx(0.1) and lrs[12] == pytest.approx(0.01)  # epoch 4
    assert lrs[24] == pytest.approx(0.001)  # epoch 8


def test_linear_ramp_peaks_then_falls_to_the_end_ratio():
    optim = OptimConfig(lr=0.5, batch_size=1024, reference_batch_size=256, lr_scaling="linear")
    schedule = ScheduleConfig(epochs=10, kind="linear", peak_epoch=2, end_lr_ratio=0.1)
    assert peak_lr(optim) == pytest.approx(2.0)
    assert lr_at(0, 100, optim, schedule) == 0.0
    assert lr_at(200, 100, optim, schedule) == pytest.approx(2.0)
    assert lr_at(600, 100, optim, schedule) == pytest.approx(2.0 * (1 - 0.9 * 0.5))
    assert lr_at(1000, 100, optim, schedule) == pytest.approx(0.2)


def test_norm_and_bias_can_be_spared_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    spared = make_optimizer(model, OptimConfig(decay_norm_and_bias=False, weight_decay=0.1))
    decays = sorted((g["weight_decay"], len(g["params"])) for g in spared.param_groups)
    assert decays == [(0.0, 3), (0.1, 1)]  # conv bias, BN weight and bias vs conv kernel
    group = make_optimizer(model, OptimConfig()).param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and len(group["params"]) == 4


def test_lr_schedule_is_lr_at_as_a_function_of_the_step_alone():
    optim = OptimConfig(lr=0.5, batch_size=1024, reference_batch_size=256, lr_scaling="linear")
    schedule = ScheduleConfig(epochs=10, kind="linear", peak_epoch=2, end_lr_ratio=0.1)
    lr = lr_schedule(optim, schedule, steps_per_epoch=100)
    assert [lr(step) for step in range(0, 1001, 50)] == [
        lr_at(step, 100, optim, schedule) for step in range(0, 1001, 50)]
    assert lr(200) == pytest.approx(2.0) and lr(1000) == pytest.approx(0.2)
    assert lr_schedule(optim, schedule, steps_per_epoch=50)(200) == pytest.approx(
        2.0 * (1 - 0.9 * 2 / 8))  # epoch 4 of 10 with 50 steps an epoch


@pytest.mark.parametrize("device", DEVICES)
def test_sgd_is_fused_on_a_gpu_and_foreach_on_the_cpu(device):
    # The one optimizer difference between the devices, on purpose: the CPU's fused kernel
    # rounds differently from the foreach update all CPU results were made with.
    model = torch.nn.Linear(3, 2).to(device)
    defaults = make_optimizer(model, OptimConfig(lr=0.1)).defaults
    assert bool(defaults["fused"]) == (device == "cuda")
    assert bool(defaults["foreach"]) == (device == "cpu")


@pytest.mark.parametrize("momentum,nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_the_update_in_a_graph_is_torchs_sgd(momentum, nesterov, monkeypatch):
    # Three steps at changing learning rates, both weight-decay groups, against torch's
    # step: the same parameters (to rounding: lr x update, then subtracted) and the same
    # state to checkpoint. Compiled as run.compile_mode = "whole-step" does on the CPU,
    # without inductor's C++ code generation; one graph for every step and learning rate.
    counter, compile_for_real = CompileCounterWithBackend("aot_eager"), torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_for_real(
        function, backend=counter))
    torch._dynamo.reset()
    config = OptimConfig(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.01,
                         decay_norm_and_bias=False)
    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)))
        optimizers.append(make_optimizer(models[-1], config))
    in_graph = sgd_in_graph(torch.device("cpu"), "default")
    inputs, start = torch.randn(3, 8, 4), [p.detach().clone() for p in models[1].parameters()]
    for lr, batch in zip((0.1, 0.05, 0.2), inputs, strict=True):
        for model, optimizer, update in zip(models, optimizers, (step_optimizer, in_graph),
                                            strict=True):
            model(batch).square().mean().backward()
            update(optimizer, lr)
            assert all(p.grad is None for p in model.parameters())
    for ours, torchs in zip(models[1].parameters(), models[0].parameters(), strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-6, atol=1e-7)
    assert all(not torch.equal(a, b) for a, b in zip(start, models[1].parameters(), strict=True))
    state, torchs_state = optimizers[1].state_dict(), optimizers[0].state_dict()
    assert state["param_groups"] == torchs_state["param_groups"]  # the last lr included
    assert state["state"].keys() == torchs_state["state"].keys()
    for key, buffers in torchs_state["state"].items():
        assert buffers.keys() == state["state"][key].keys()
        for name, buffer in buffers.items():
            torch.testing.assert_close(state["state"][key][name], buffer, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_a_checkpoint_of_either_update_resumes_under_the_other(monkeypatch):
    # A run resumed with another run.compile_mode loads the same optimizer state: two steps
    # of one update, the state dict through a fresh optimizer, two of the other.
    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_for_real(
        function, backend="aot_eager"))
    config, batches = OptimConfig(lr=0.1, weight_decay=0.01), torch.randn(4, 8, 4)
    in_graph = sgd_in_graph(torch.device("cpu"), "default")
    finals = []
    for first, then in ((step_optimizer, step_optimizer), (step_optimizer, in_graph),
                        (in_graph, step_optimizer)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = make_optimizer(model, config)
        for i, batch in enumerate(batches):
            if i == 2:  # as load_checkpoint does: the state into a new optimizer
                saved = optimizer.state_dict()
                optimizer = make_optimizer(model, config)
                optimizer.load_state_dict(saved)
            model(batch).square().mean().backward()
            (first if i < 2 else then)(optimizer, 0.1)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for resumed in finals[1:]:
        torch.testing.assert_close(resumed, finals[0], rtol=1e-6, atol=1e-7)


def test_the_update_in_a_graph_skips_an_empty_group(monkeypatch):
    # No vectors to spare weight decay: an empty group, which torch's foreach ops refuse.
    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_for_real(
        function, backend="aot_eager"))
    model = torch.nn.Linear(4, 3, bias=False)
    optimizer = make_optimizer(model, OptimConfig(decay_norm_and_bias=False))
    assert [len(group["params"]) for group in optimizer.param_groups] == [1, 0]
    before = model.weight.detach().clone()
    model(torch.randn(8, 4)).square().mean().backward()
    sgd_in_graph(torch.device("cpu"), "default")(optimizer, 0.1)
    assert not torch.equal(model.weight, before)
