"""Read back the table rows the callbacks write to TensorBoard (`<log_dir>/<table>_rows/<row>`)."""
from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata, plugin_data_pb2


def row_runs(log_dir: Path, table: str) -> dict[str, dict]:
    """`{row run name: {"hparams": {...}, "scalars": {tag: [(step, value)]}}}` of one table."""
    found = {}
    for run in sorted((Path(log_dir) / f"{table}_rows").iterdir()):
        events = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
        events.Reload()
        content = events.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        hparams = {}
        for key, value in start.hparams.items():
            kind = value.WhichOneof("kind")
            hparams[key] = getattr(value, kind)
        # by step: a run written by several writers (periodic, then final) has several event files,
        # whose order on reading follows their names (timestamps), not the steps
        scalars = {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}
        found[run.name] = {"hparams": hparams, "scalars": scalars}
    return found
