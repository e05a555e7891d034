"""Where each stage reads and writes, relative to the project root (the folder holding dvc.yaml)."""

from pathlib import Path

# The pipeline's stages in dvc.yaml order: the CLI's choices, the flows' dispatch and preflight all come from here.
STAGES = ("prepare", "pretrain", "selectors", "search", "constrain", "rank", "finetune", "export", "report")

PREPARED = Path("data/prepared")
BASE = Path("models/base.pt")
PRUNED_INIT = Path("models/pruned_init.pt")
PRUNED = Path("models/pruned.pt")
BASE_ONNX = Path("models/base.onnx")
PRUNED_ONNX = Path("models/pruned.onnx")
INT8 = Path("models/int8")  # export.quantize: int8 writes pruned.onnx here; otherwise a note says why it is empty
SCHEME = Path("artifacts/scheme.json")
METRICS = Path("metrics")
PLOTS = Path("plots")
SUMMARY = METRICS / "summary.json"
ACCURACY_VS_FLOPS = PLOTS / "accuracy_vs_flops.csv"


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def history_file(stage: str) -> Path:
    return PLOTS / f"{stage}_history.csv"


FEATURES = Path("artifacts/features")
SELECTORS = Path("models/selectors.pt")
SEARCH = Path("artifacts/search")
CANDIDATES = Path("artifacts/candidates")
JOINT_FRONT = Path("artifacts/joint_front.json")
GPIR_TABLE = Path("artifacts/gpir_table.json")
CHECKPOINTS = Path(".emoprune/checkpoints")
SCHEMES = Path("artifacts/schemes")
