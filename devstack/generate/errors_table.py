"""DEV ONLY: renders docs/errors.md from the error kinds in contract/errors.py, so the documented exit
codes and reasons can never drift from the code (a test compares the file with this output)."""

from __future__ import annotations

from enginebuild_contract.errors import KINDS

TARGETS = ("docs/errors.md",)


def render() -> str:
    """docs/errors.md, generated so the documented exit codes can never drift from the code."""
    lines = [
        "# Builder exit codes and condition reasons",
        "",
        "Generated from `contract/errors.py` by `enginebuild-dev errors-table --write` (a test compares).",
        "Permanent errors fail the Job at once through its podFailurePolicy; retriable ones are retried up",
        "to `spec.backoffLimit`. Exit codes never change meaning; new ones are only added.",
        "",
        "An error caused by the spec or its inputs starts with the field or option at fault and says what",
        "to do, e.g. `model.checkpoint: ckpt.safetensors holds NaN or infinite values in 2 tensor(s): ...`",
        "or `model.config: text_cfg.vocab_size is 1000 in tiny.json, smaller than its tokenizer's 49408",
        "tokens: ... Set text_cfg.vocab_size to 49408`. The builder prints it as one log line (no",
        "traceback) and puts it in the termination message and `report.json` (`error`), so the operator",
        "shows it in the `Ready` condition. Only exit 1 (`InternalError`) means a bug in the builder.",
        "",
        "| field / option | what is checked | reason |",
        "|---|---|---|",
        "| `--spec` | a readable UTF-8 YAML file (or `env:NAME`), valid against the schema | `InvalidSpec` |",
        "| `--workdir`, `--stages`, `--target`, `--device` | a writable folder; known stages and targets; a visible GPU for `cuda` | `InvalidSpec` |",
        "| `model.checkpoint` | exists (local or S3); a state dict of dense, finite tensors, no code-carrying pickle | `CheckpointNotFound`, `CheckpointUnreadable` |",
        "| `model.checkpoint` vs the architecture | every key present, none extra, every shape equal | `CheckpointMismatch` |",
        "| `model.architecture`, `model.config` | a known open_clip name, or a readable open_clip config open_clip can build | `UnknownArchitecture` |",
        "| `model.config` | each tower runs one input of its own shape; the text vocabulary covers the tokenizer's | `ModelConfigInvalid` |",
        "| `calibration.source` | exists; images readable and under Pillow's pixel limit; `captions.txt` UTF-8 | `CalibrationUnreadable` |",
        "",
        "| exit code | reason | retried | meaning |",
        "|---|---|---|---|",
    ]
    for kind in sorted(KINDS.values(), key=lambda k: k.exit_code):
        lines.append(f"| {kind.exit_code} | `{kind.reason}` | {'yes' if kind.retriable else 'no'} | {kind.summary} |")
    return "\n".join(lines) + "\n"
