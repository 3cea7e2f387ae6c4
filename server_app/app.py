"""The ServerApp: validates the config, runs the federation, and saves the results."""

from __future__ import annotations

import os
import time

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.data.client_data import central_test_set
from common.data.datasets import Dataset
from common.data.scaling import FeatureScaling
from common.evaluation import Evaluation, evaluate_in_detail
from common.logs import keep_root_logger_quiet
from common.models import build_model
from server_app import linkstate_index
from server_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server_app.diagnostics import DIAGNOSTICS_FILE, Diagnostics
from server_app.federation import Federation, PrivacyTally, Stop, WaitTimeout
from server_app.health import RunHealth
from server_app.output_dir import prepare_output_dir
from server_app.privacy import guarantee_sentence, plan_privacy, privacy_columns
from server_app.results import RunRecorder
from server_app.sampling import ClientSampler, SeededChoices
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
    print(f"Writing results to {output_dir}", flush=True)
    private = config.privacy.private
    if private:
        print(f"Exact counts and per-client events go to {DIAGNOSTICS_FILE} (mode 0600, operator-only, not released)",
              flush=True)

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
    federation = Federation(
        grid=grid,
        strategy=build_strategy(config, federated_evaluation),
        privacy=None,
        eval_sampler=ClientSampler(config.fraction_evaluate, SeededChoices(config.seed + 1)),
        recorder=recorder,
        diagnostics=Diagnostics(output_dir, private),
        central_eval=central_eval,
        num_features=test_set.num_features,
        num_classes=test_set.num_classes,
        min_available_clients=config.min_available_clients,
        federated_evaluation=federated_evaluation,
        max_epsilon=config.max_epsilon,
        wait_timeout=config.wait_timeout,
        identify_clients=config.identify_clients,
        scaling=scaling,
        health=RunHealth(test_set.num_classes, len(set(test_set.y.tolist()))),
        # dpsgd/local clients clip at the configured norm (server/client modes record theirs per round).
        tally=PrivacyTally(clipping_norm=config.clipping_norm if config.privacy.self_protecting else None),
    )
    arrays, first_round, elapsed_before = ArrayRecord(model.state_dict()), 1, 0.0
    if checkpoint is not None:
        reference = {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}
        stored = checkpoint.model_for(reference)  # names, shapes and dtypes of this run's model
        num_clients = federation.restore(checkpoint.federation, checkpoint.arrays, config, reference, checkpoint.secret)
        recorder.restore(checkpoint.rows)
        arrays = ArrayRecord({name: Array(value) for name, value in stored.items()})
        first_round, elapsed_before = checkpoint.completed_rounds + 1, checkpoint.elapsed_seconds
        print(f"Resuming after round {checkpoint.completed_rounds} from {output_dir}", flush=True)
    else:
        try:
            num_clients = len(federation.wait_for_clients())
        except WaitTimeout as timeout:
            federation.stopped = Stop("clients", f"stopped before round 1: {timeout}")
            print(federation.stopped.reason, flush=True)
            _finish(config, recorder, federation, arrays, elapsed_before + time.monotonic() - started, 0,
                    len(test_set.y))
            return
        federation.privacy = plan_privacy(config, num_clients)

    def save(completed_round: int, current: ArrayRecord) -> None:
        state, strategy_arrays = federation.state(num_clients)
        elapsed = elapsed_before + time.monotonic() - started
        model_arrays = {name: array.numpy() for name, array in current.items()}
        save_checkpoint(output_dir, Checkpoint(completed_round, model_arrays, state, strategy_arrays, recorder.rows,
                                               config.to_dict(), elapsed, federation.privacy.secret))

    recorder.constant_columns = privacy_columns(config, federation.privacy)
    federation.on_round_end = save
    if config.audit_canaries:  # fl-dp audit: every released model, for the canary scores
        from server_app.audit_rounds import keeping_models

        federation.on_round_end = keeping_models(output_dir, save, arrays, first_round)
    with federation.diagnostics.flower_counts_diverted():
        final, _ = federation.run(arrays, config.num_server_rounds, first_round)
    _finish(config, recorder, federation, final, elapsed_before + time.monotonic() - started, num_clients,
            len(test_set.y))
    if federation.stopped.error is not None:  # no client returned an update: Flower marks the run failed
        raise federation.stopped.error


def _finish(config: RunConfig, recorder: RunRecorder, federation: Federation, final: ArrayRecord, wall_seconds: float,
            num_clients: int, central_examples: int) -> None:
    """Write the summary, the final model (the last completed round's) and the plots; say where they
    are, what they guarantee, and, as the last line, ``fl-dp stop-kind: <kind>`` for launchers."""
    stop = federation.stopped
    plan, debug_clients = federation.privacy, federation.tally.debug_clients
    warnings = federation.health.warnings if federation.health is not None else []
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
    print(
        f"Done ({stop.reason}): final central accuracy "
        f"{'n/a' if accuracy is None else f'{accuracy:.4f}'} after {summary['rounds']} rounds "
        f"in {summary['wall_seconds']:.1f}s. Results in {recorder.output_dir}",
        flush=True,
    )
    print(f"Privacy: {guarantee}", flush=True)
    for warning in warnings:
        print(f"WARNING: {warning}", flush=True)
    print(f"fl-dp stop-kind: {stop.kind}", flush=True)  # the last line; launchers map it to their exit code
