"""The ServerApp: validates the config, runs the federation, and saves the results."""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.data.client_data import central_test_set
from common.data.datasets import Dataset
from common.data.scaling import FeatureScaling
from common.evaluation import Evaluation, evaluate_in_detail
from common.logs import keep_root_logger_quiet
from common.models import build_model
from common.privacy.signal import noise_warning
from server_app import linkstate_index, run_state
from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server_app.diagnostics import DIAGNOSTICS_FILE, Diagnostics
from server_app.federation import Federation, PrivacyTally, Stop, WaitTimeout, wait_for_clients
from server_app.health import RunHealth
from server_app.output_dir import prepare_output_dir
from server_app.privacy import PrivacyPlan, guarantee_sentence, plan_privacy, privacy_columns
from server_app.results import RunRecorder
from server_app.sampling import ClientSampler, SeededChoices
from server_app.status import say
from server_app.strategies import build_strategy

keep_root_logger_quiet()
app = ServerApp()


def default_output_dir() -> str:
    return os.path.join(os.path.expanduser("~"), "fl-dp-runs", time.strftime("run-%Y%m%d-%H%M%S"))


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    config = RunConfig.from_run_config(context.run_config)
    if config.index_idle_nodes:  # opt-in, private Flower API: see server_app/linkstate_index.py
        linkstate_index.install()
    output_dir = config.output_dir or default_output_dir()
    # Before anything is written: a new run refuses a used output-dir (or moves it aside), and a
    # resume reads and checks its checkpoint (plain data, never executed) before it changes a file.
    prepare_output_dir(output_dir, config.resume, config.overwrite)
    checkpoint = load_checkpoint(output_dir, config.to_dict()) if config.resume else None
    recorder = RunRecorder(output_dir, config.to_dict() | {"output-dir": output_dir})
    say(f"Writing results to {output_dir}")
    private = config.privacy.private
    if private:
        say(f"Exact counts and per-client events go to {DIAGNOSTICS_FILE} (mode 0600, operator-only, not released)")

    # Reads the shared data cache when it already holds the dataset; builds and writes only here.
    test_set = central_test_set(config, cache_root=os.path.join(output_dir, "cache"))
    # Users' tables are standardised with the server's own held-out statistics (common/data/scaling.py).
    scaling = FeatureScaling.fit(test_set.x) if config.dataset == "file" else None
    if scaling is not None:
        test_set = Dataset(scaling.apply(test_set.x), test_set.y, test_set.num_classes)
    model = build_model(config.model, test_set.num_features, test_set.num_classes, seed=config.seed)

    def central_eval(arrays: ArrayRecord) -> Evaluation:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate_in_detail(model, test_set.x, test_set.y)

    # Per-client metrics are computed on private data: in DP modes they are not collected.
    federated_evaluation = config.fraction_evaluate > 0 and config.val_fraction > 0 and not config.privacy.private
    health = RunHealth(test_set.num_classes, len(set(test_set.y.tolist())))
    arrays, first_round, elapsed_before = ArrayRecord(model.state_dict()), 1, 0.0
    reference = {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}
    # dpsgd/local clients clip at the configured norm (server/client modes record theirs per round).
    tally = PrivacyTally(clipping_norm=config.clipping_norm if config.privacy.self_protecting else None)
    eval_choices = SeededChoices(config.seed + 1)
    identities: dict[int, str] = {}
    if checkpoint is not None:
        # Checked (names, shapes and dtypes against this run's model) before anything is used.
        stored = checkpoint.model_for(reference)
        resumed = run_state.resumed_federation(checkpoint.federation, config, checkpoint.secret)
        plan, num_clients, eval_choices = resumed.privacy, resumed.num_clients, resumed.eval_choices
        tally, identities = PrivacyTally(**resumed.tally), resumed.identities
        recorder.restore(checkpoint.rows)
        arrays = ArrayRecord({name: Array(value) for name, value in stored.items()})
        first_round, elapsed_before = checkpoint.completed_rounds + 1, checkpoint.elapsed_seconds
    else:
        try:
            nodes = wait_for_clients(grid, config.min_available_clients, "min-available-clients", config.wait_timeout)
        except WaitTimeout as timeout:
            stop = Stop("clients", f"stopped before round 1: {timeout}")
            say(stop.reason)
            _finish(config, recorder, stop, None, tally, health, arrays, elapsed_before + time.monotonic() - started,
                    0, len(test_set.y))
            return
        num_clients = len(nodes)
        plan = plan_privacy(config, num_clients)
        _warn_if_noise_swamps(config, plan, model, health)
    strategy = plan.wrap(build_strategy(config, federated_evaluation))
    if checkpoint is not None:
        run_state.restore_strategy(strategy, resumed.strategy, checkpoint.arrays, reference)
        say(f"Resuming after round {checkpoint.completed_rounds} from {output_dir}")
    federation = Federation(
        grid=grid,
        strategy=strategy,
        privacy=plan,
        eval_sampler=ClientSampler(config.fraction_evaluate, eval_choices),
        recorder=recorder,
        diagnostics=Diagnostics(output_dir, private),
        central_eval=central_eval,
        num_features=test_set.num_features,
        num_classes=test_set.num_classes,
        min_available_clients=config.min_available_clients,
        federated_evaluation=federated_evaluation,
        tally=tally,
        health=health,
        max_epsilon=config.max_epsilon,
        wait_timeout=config.wait_timeout,
        identify_clients=config.identify_clients,
        identities=identities,
        scaling=scaling,
    )

    def save(completed_round: int, current: ArrayRecord) -> None:
        state, strategy_arrays = federation.state(num_clients)
        elapsed = elapsed_before + time.monotonic() - started
        model_arrays = {name: array.numpy() for name, array in current.items()}
        save_checkpoint(output_dir, Checkpoint(completed_round, model_arrays, state, strategy_arrays, recorder.rows,
                                               config.to_dict(), elapsed, plan.secret))

    recorder.constant_columns = privacy_columns(config, plan)
    on_round_end: Callable[[int, ArrayRecord], None] = save
    if config.audit_canaries:  # fl-dp audit: every released model, for the canary scores
        from server_app.audit_rounds import keeping_models

        on_round_end = keeping_models(output_dir, save, arrays, first_round)
    with federation.diagnostics.flower_counts_diverted():
        final, _ = federation.run(arrays, config.num_server_rounds, first_round, on_round_end)
    ending = federation.stopped
    assert ending is not None, "Federation.run always says how it stopped"
    _finish(config, recorder, ending, plan, tally, health, final, elapsed_before + time.monotonic() - started,
            num_clients, len(test_set.y))
    if ending.error is not None:  # no client returned an update: Flower marks the run failed
        raise ending.error


def _warn_if_noise_swamps(config: RunConfig, plan: PrivacyPlan, model: torch.nn.Module, health: RunHealth) -> None:
    """User-level DP: say before training when the planned noise outweighs any possible update."""
    if plan.mechanism is None or plan.noise_multiplier is None:
        return
    num_params = sum(parameter.numel() for parameter in model.parameters())
    # The noise the updates really get: z_delta >= z with adaptive clipping (its count query shares the budget).
    text = noise_warning(plan.mechanism.update_noise_multiplier, config.clipping_norm, plan.expected_clients, num_params,
                         config.num_server_rounds)
    if text is not None:
        health.before_training("noise-swamped", text)
        say(f"WARNING: {text}")


def _finish(config: RunConfig, recorder: RunRecorder, stop: Stop, plan: PrivacyPlan | None, tally: PrivacyTally,
            health: RunHealth, final: ArrayRecord, wall_seconds: float, num_clients: int, central_examples: int) -> None:
    """Write the summary, the final model (the last completed round's) and the plots; say where they
    are, what they guarantee, and, as the last line, ``fl-dp stop-kind: <kind>`` for launchers."""
    debug_clients, warnings = tally.debug_clients, health.warnings
    last = recorder.rows[-1] if recorder.rows else {}
    columns = privacy_columns(config, plan)
    guarantee = guarantee_sentence(
        config, plan, len(recorder.rows), last.get("epsilon"), last.get("sample_epsilon_max"), debug_clients
    )
    summary = recorder.finish(
        final.to_torch_state_dict(),
        wall_seconds,
        {
            "strategy": config.strategy,
            "dataset": config.dataset,
            "dp": config.dp,
            "epsilon": last.get("epsilon"),
            "sample_epsilon_max": last.get("sample_epsilon_max"),
            "noise_multiplier": last.get("noise_multiplier"),
            "num_clients": num_clients,
            "stop_kind": stop.kind,
            "stop_reason": stop.reason,
            "interrupted_round": stop.interrupted,
            "guarantee": guarantee,
            "debug_noise": bool(plan is not None and plan.insecure) or debug_clients,
            "central_examples": central_examples,
            "warnings": warnings,
        } | columns,
    )
    accuracy = summary["final_central_accuracy"]
    say(
        f"Done ({stop.reason}): final central accuracy "
        f"{'n/a' if accuracy is None else f'{accuracy:.4f}'} after {summary['rounds']} rounds "
        f"in {summary['wall_seconds']:.1f}s. Results in {recorder.output_dir}"
    )
    say(f"Privacy: {guarantee}")
    for warning in warnings:
        say(f"WARNING: {warning}")
    say(f"fl-dp stop-kind: {stop.kind}")  # the last line; launchers map it to their exit code
