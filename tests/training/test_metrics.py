"""The controller-side metrics log: one line per step, and a restart's repeated steps replace the old ones."""

from __future__ import annotations

from stylear_core.training.metrics import MetricsLogCallback, ThroughputMeter, read_metrics_log


def test_metrics_log_keeps_each_step_once_across_a_restart(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    callback = MetricsLogCallback(log, total_steps=5)
    for step in (1, 2, 3):
        callback.after_report(None, [{"step": step, "loss": 10.0 - step}, {"step": step, "loss": 0.0}], None)
    # The worker group restarted from the checkpoint at step 2: step 3 runs again.
    for step in (3, 4, 5):
        callback.after_report(None, [{"step": step, "loss": 20.0 - step}], None)
    callback.after_report(None, [{"no_step": 1}], None)
    rows = read_metrics_log(log)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [9.0, 8.0, 17.0, 16.0, 15.0]  # rank 0's values, the rerun's step 3

    # A new job attempt (a new controller) resuming at step 4 drops the old steps 4 and 5.
    MetricsLogCallback(log, total_steps=5).after_report(None, [{"step": 4, "loss": 1.0}], None)
    assert [(r["step"], r["loss"]) for r in read_metrics_log(log)] == [
        (1, 9.0),
        (2, 8.0),
        (3, 17.0),
        (4, 1.0),
    ]


def test_a_report_with_history_logs_every_step_it_carries(tmp_path):
    log = tmp_path / "metrics.jsonl"
    callback = MetricsLogCallback(log, total_steps=6)
    history = [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
    callback.after_report(None, [{**history[-1], "history": history}], None)
    callback.after_report(None, [{"step": 4, "loss": 4.0, "history": [{"step": 4, "loss": 4.0}]}], None)
    rows = read_metrics_log(log)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("history" not in r for r in rows)


def test_throughput_meter_divides_tokens_by_elapsed_time():
    meter = ThroughputMeter()
    seconds, rate = meter.mark(1000)
    assert seconds > 0 and abs(rate * seconds - 1000) < 1e-6


def _open_bars(description: str) -> list[dict]:
    from ray.experimental import tqdm_ray

    groups = tqdm_ray.instance().bar_groups.values()
    return [
        bar.state
        for group in groups
        for bar in group.bars_by_uuid.values()
        if description in bar.state["desc"]
    ]


def test_the_progress_bar_closes_at_the_last_step_and_on_a_worker_failure(tmp_path, monkeypatch):
    """The driver redraws every open bar around each line it prints: a finished run's bar left open
    would repeat itself through the logs of every later stage of the job."""
    from ray.experimental import tqdm_ray

    seen: list[dict] = []
    manager = tqdm_ray.instance()
    update = manager.process_state_update
    monkeypatch.setattr(
        manager, "process_state_update", lambda state: (seen.append(dict(state)), update(state))
    )
    callback = MetricsLogCallback(tmp_path / "metrics.jsonl", total_steps=4, description="bar-test")
    callback.after_report(None, [{"step": 2, "loss": 2.0}], None)
    assert [bar["x"] for bar in _open_bars("bar-test")] == [2]  # open while the run goes on
    # A worker fails: the bar closes, and the restarted attempt opens a new one at its next report.
    callback.after_exception(None, {0: RuntimeError("worker died")})
    assert _open_bars("bar-test") == []
    callback.after_report(None, [{"step": 3, "loss": 1.5}], None)
    assert [bar["x"] for bar in _open_bars("bar-test")] == [3]
    callback.after_report(None, [{"step": 4, "loss": 1.0}], None)
    assert _open_bars("bar-test") == []
    # Its last state reached the driver although it came within the bar's flush interval.
    assert seen[-1]["closed"] and seen[-1]["x"] == 4 and "loss 1.0000" in seen[-1]["desc"]
