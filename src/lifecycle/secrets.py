"""Secrets (tokens, API keys, passwords) kept out of logs and out of what a run writes.

A secret is the string value of a config key, or of an environment variable present at start-up, whose
name ends in token, api_key / apikey, secret, secret_key, access_key, private_key, password, passwd or
credential(s), in any case (`pad_token_id`, `max_new_tokens` and TOKENIZERS_PARALLELISM are not secrets).
`redact` replaces secrets in configs, `SecretFilter` masks them in log records, and `protect`
applies both at start-up: to every log handler and to Hydra's records of the run (.hydra/*.yaml).
Pass secrets by environment variable (`+model.token=${oc.env:MY_TOKEN}`): the interpolation, not
the value, is what Hydra records; a literal value for a secret-named key is refused at start-up
(`lifecycle.config.validate`). `masked_argv` keeps secret values out of what libraries copy from the
command line (wandb's run metadata records `sys.argv`).
"""

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

MARKER = "***REDACTED***"
SECRET_NAME = re.compile(r"(^|[_.-])(token|api_?key|secret|(secret|access|private)_?key|passw(or)?d|credentials?)$",
                         re.IGNORECASE)
MIN_LENGTH = 6  # shorter values (flags, small numbers) are not searched for in other text
OVERRIDE = re.compile(r"^([+~]*)([\w.\[\]/@-]+)=(.*)$", re.S)
HYDRA_RECORDS = ("config.yaml", "overrides.yaml", "hydra.yaml")


def is_secret_name(name) -> bool:
    """Whether a key (its last dotted part) or an environment variable names a secret."""
    return bool(SECRET_NAME.search(str(name).rsplit(".", 1)[-1]))


def secret_paths(node, path: str = ""):
    """(dotted path, raw value) of every secret-named string in a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if is_secret_name(key) and isinstance(value, str):
                yield sub, value
            else:
                yield from secret_paths(value, sub)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from secret_paths(value, f"{path}[{i}]")


def secret_values(cfg: DictConfig | None = None, environ=os.environ) -> set[str]:
    """The secrets of this process: secret-named environment variables, and secret-named config values
    (interpolations such as `${oc.env:MY_TOKEN}` resolved)."""
    values = {v for k, v in environ.items() if is_secret_name(k)}
    if cfg is not None:
        for path, raw in secret_paths(OmegaConf.to_container(cfg, resolve=False)):
            value = OmegaConf.select(cfg, path, throw_on_resolution_failure=False) if "${" in raw else raw
            if isinstance(value, str):
                values.add(value)
    return {v for v in values if len(v) >= MIN_LENGTH}


def mask(text: str, values) -> str:
    """`text` with each secret value replaced by MARKER; a `key=value` override of a secret key keeps only the key."""
    if (m := OVERRIDE.match(text)) and is_secret_name(m[2]) and m[3] and "${" not in m[3]:
        return f"{m[1]}{m[2]}={MARKER}"
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MARKER)
    return text


def redact(node, values=()):
    """A plain copy of a config (or dict, list, str): secret-named keys' values, and any known secret
    value inside other strings, replaced by MARKER. Unresolved interpolations (`${oc.env:...}`) stay."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return {k: MARKER if is_secret_name(k) and isinstance(v, str) and v and "${" not in v else redact(v, values)
                for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v, values) for v in node]
    return mask(node, values) if isinstance(node, str) else node


class SecretFilter(logging.Filter):
    """Masks secret values in each record's message (its arguments merged in) and exception text."""

    def __init__(self, values):
        super().__init__()
        self.values = sorted(values, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.values:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: the handler reports it as logging does
            return True
        masked = mask(message, self.values)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text, self.values)
        return True


def install(values) -> SecretFilter:
    """Put one SecretFilter on every handler of every logger (the root's console and Hydra's log file,
    and libraries' own handlers), replacing any installed before."""
    secret_filter = SecretFilter(values)
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers}:
        for old in [f for f in handler.filters if isinstance(f, SecretFilter)]:
            handler.removeFilter(old)
        handler.addFilter(secret_filter)
    return secret_filter


def hydra_records() -> list[Path]:
    """Hydra's records of the current run: .hydra/{config,overrides,hydra}.yaml, and a sweep's multirun.yaml."""
    if not HydraConfig.initialized():
        return []
    hc = HydraConfig.get()
    files = [Path(hc.runtime.output_dir) / hc.output_subdir / n for n in HYDRA_RECORDS] if hc.output_subdir else []
    if hc.mode == RunMode.MULTIRUN:
        files.append(Path(hc.sweep.dir) / "multirun.yaml")
    return [f for f in files if f.is_file()]


@contextmanager
def masked_argv(values=()):
    """`sys.argv` with secret-named overrides and the process's secret values (environment, `values`) masked,
    for the duration of the block (a launcher re-running the command line still finds it as typed)."""
    argv = sys.argv
    sys.argv = [mask(a, secret_values() | set(values)) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv


def protect(cfg: DictConfig) -> set[str]:
    """At start-up: mask this run's secrets in every log handler and rewrite Hydra's records of the run
    redacted (they hold the command-line overrides verbatim). Returns the secret values."""
    values = secret_values(cfg)
    install(values)
    for path in hydra_records():
        record = OmegaConf.to_container(OmegaConf.load(path))
        if (clean := redact(record, values)) != record:
            OmegaConf.save(OmegaConf.create(clean), path)
    return values
