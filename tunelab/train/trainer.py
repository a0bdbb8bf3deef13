"""The training loop: data, model, optimizer, schedule, accumulation, eval, checkpoints.

One step = one global batch. Every micro-batch's summed token loss is divided by the number of
supervised tokens of the whole global batch (all micro-batches, all data-parallel ranks,
all-reduced before the first backward), so accumulation and data parallelism give the
gradients of one big batch.

Seams for distributed and LoRA runs: ``Trainer.mesh`` (None on one process) is built from
``parallel`` under torchrun and handed to ``parallelize``; ``_global_count`` / ``_global_loss``
reduce over its data-parallel group; ``model_parts`` is a list so a pipeline stage split can
hold several parts. LoRA (``lora.r > 0``) is applied before parallelizing; only trainable
parameters are optimized and checkpointed, and the run ends with a PEFT adapter.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tunelab.config import RunConfig, parse_blend, parse_split
from tunelab.data import dataset as ds
from tunelab.errors import CheckpointError, ConfigError, DataError, TunelabError
from tunelab.train.checkpoint import CheckpointManager
from tunelab.train.metrics import MetricsLogger, memory_gib, peak_flops
from tunelab.train.optim import LRSchedule, Scheduler, build_optimizer
from tunelab.utils import atomic_write_text

logger = logging.getLogger(__name__)


class TrainingError(TunelabError):
    """The run cannot continue (a non-finite loss under nan_policy=stop, ...)."""


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss
    eval_losses: dict[int, float] = field(default_factory=dict)
    last_step: int = 0
    stopped_by_signal: int | None = None  # the signal number
    skipped_steps: int = 0


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _clean(name: str) -> str:
    # checkpoint / compile wrappers add prefixes to named_parameters (not to state_dict)
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name


class Trainer:
    """Build with a validated :class:`RunConfig`; :meth:`train` runs to the end or a signal.

    ``callbacks`` are called as ``cb(trainer, step, record)`` after every optimizer step
    (record: the step's metrics); tests use them to observe or interrupt a run.
    """

    def __init__(
        self,
        cfg: RunConfig,
        callbacks: list[Callable[[Trainer, int, dict], None]] | None = None,
    ):
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.out = Path(cfg.train.output_dir)
        self._signal: int | None = None
        self.mesh = None
        self.env = None
        self._setup_process()
        cfg.validate(self.world_size)
        self._setup_data_sources()
        self._setup_model()
        self._setup_optim()
        self._setup_loaders()
        self.ckpt = CheckpointManager(self.out, cfg.checkpoint.keep_last)
        self.step = 0
        self._resume()

    # ---- setup ---------------------------------------------------------------------------
    def _setup_process(self) -> None:
        from tunelab.parallel.launch import init_distributed

        self.env = init_distributed(self.cfg.train.device)
        self.device = self.env.device
        self.rank = self.env.rank
        self.world_size = self.env.world_size
        self.is_main = self.env.is_main
        self.dp_rank, self.dp_size = 0, 1
        if self.env.distributed:
            from tunelab.parallel.dims import ParallelDims, dp_rank, dp_size

            self.dims = ParallelDims.from_config(self.cfg.parallel, self.world_size)
            self.mesh = self.dims.build_mesh(self.device.type)
            self.dp_rank, self.dp_size = dp_rank(self.mesh), dp_size(self.mesh)
        torch.manual_seed(self.cfg.train.seed)

    def _setup_data_sources(self) -> None:
        c = self.cfg
        tok_dir = c.data.tokenizer or c.model.path
        self.tokenizer = None
        self.tokenizer_dir = None
        if tok_dir and (Path(tok_dir) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            self.tokenizer_dir = tok_dir
        elif c.data.tokenizer:
            raise ConfigError(f"data.tokenizer={c.data.tokenizer}: no tokenizer_config.json there")
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        pad = c.data.pad_token_id
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else pad
        split = parse_split(c.data.split)

        def sources(blend_items: list[str], part: int | None):
            out = []
            for w, prefix in parse_blend(blend_items):
                out.append((w, self._source(prefix, part, split, eos)))
            return out

        self.train_sources = sources(c.data.path, 0)
        if c.data.eval_path:
            self.eval_sources = [s for _, s in sources(c.data.eval_path, None)]
        elif split[1] > 0:
            self.eval_sources = [s for _, s in sources(c.data.path, 1)]
        else:
            self.eval_sources = []

    def _source(self, prefix: str, part: int | None, split, eos):
        c = self.cfg.data
        if c.mode == "pretrain":
            probe = ds.IndexedDataset(ds.pretrain_prefix(prefix))
        else:
            probe = ds.IndexedDataset(ds.sft_field_prefixes(prefix)["input_ids"])
        rng = None if part is None else ds.split_range(probe.num_documents, split, part)
        if c.mode == "pretrain":
            return ds.PretrainSource(prefix, c.seq_length, rng, c.reset_position_ids, eos)
        return ds.SFTSource(prefix, rng, eos, c.packed, c.reset_position_ids)

    def _setup_model(self) -> None:
        c = self.cfg
        from tunelab.model.config import ModelConfig

        if c.model.path:
            from tunelab.model.hf import load_model

            self.model_config = ModelConfig.from_hf(c.model.path)
            model = load_model(
                c.model.path, torch.float32, self.device, attn_backend=c.model.attn_backend
            )
        else:
            from tunelab.model.init import build_from_scratch, init_weights

            self.model_config = ModelConfig.from_hf(c.model.config)
            model = build_from_scratch(
                self.model_config, c.train.seed, torch.float32, self.device, c.model.attn_backend
            )
            if c.model.init_std is not None:
                init_weights(model, c.train.seed, c.model.init_std)
        all_sources = [s for _, s in self.train_sources] + self.eval_sources
        ds.check_sources(all_sources, self.model_config.vocab_size, c.data.seq_length)
        if self.mesh is not None:
            self.dims.check_model(self.model_config, c.parallel)
        self.lora_spec = None
        if c.lora.r > 0 and c.parallel.pp > 1:
            raise ConfigError(
                "lora.r > 0 with parallel.pp > 1 is not supported yet; use FSDP (dp_shard) "
                "and/or tensor parallelism (parallel.tp) for LoRA runs"
            )
        if c.lora.r > 0:
            from tunelab.model.lora import LoraSpec, apply_lora, load_peft_adapter

            self.lora_spec = LoraSpec(
                r=c.lora.r,
                alpha=c.lora.alpha,
                dropout=c.lora.dropout,
                target_modules=c.lora.target_modules,
                use_rslora=c.lora.use_rslora,
            )
            base_dtype = _dtype(c.lora.base_dtype) if c.lora.base_dtype else None
            if c.lora.load:
                # the adapter's own ranks / alphas / targets win over the lora section's
                self.lora_spec = load_peft_adapter(model, c.lora.load, base_dtype=base_dtype)
                if self.lora_spec.r != c.lora.r:
                    logger.warning(
                        "lora.load %s has r=%d; lora.r=%d is ignored",
                        c.lora.load,
                        self.lora_spec.r,
                        c.lora.r,
                    )
            else:
                apply_lora(model, self.lora_spec, base_dtype=base_dtype)
        model.train()
        # Pure bf16: the model computes in bf16; an fp32 copy is what the optimizer updates.
        self.master = None
        # Under torchrun, pure bf16 is FSDP's bf16 parameters over fp32 shards (the same
        # fp32-master arithmetic, sharded), i.e. the bf16-mixed policy.
        self.precision = c.train.precision
        if self.mesh is not None and self.precision == "bf16":
            self.precision = "bf16-mixed"
        if c.train.precision == "bf16" and self.mesh is None:
            import copy

            self.master = copy.deepcopy(model)
            model.to(torch.bfloat16)
        self.pipeline = None
        if self.mesh is not None and self.dims.pp_enabled:
            from tunelab.parallel.pipeline import build_pipeline

            self.pipeline = build_pipeline(
                model,
                self.mesh,
                c.parallel,
                c.grad_accum_steps(self.world_size),
                self.device,
                precision=self.precision,
            )
            self.model_parts = list(self.pipeline.model_parts)
        else:
            from tunelab.parallel.parallelize import parallelize

            parallelize(model, c.parallel, self.mesh, precision=self.precision)
            self.model_parts = [model]
        self.model = model  # the whole model (under pp: the unsplit one, for names only)
        self.flops_per_token = self.model_config.flops_per_token(c.data.seq_length)

    def _setup_optim(self) -> None:
        # What the optimizers update: the fp32 master (pure bf16) or the model parts (one
        # optimizer per pipeline stage, so each optimizer's state maps to one module).
        self.opt_parts = [self.master] if self.master is not None else self.model_parts
        self.optimizers = [build_optimizer(part, self.cfg.optim) for part in self.opt_parts]
        self.scheduler = Scheduler(self.optimizers, LRSchedule.from_config(self.cfg))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimizers[0]

    def _setup_loaders(self) -> None:
        c = self.cfg
        gbs = c.global_batch_size(self.world_size)
        packed = all(s.packed for _, s in self.train_sources)
        m = c.data.pad_to_multiple_of
        if c.data.mode == "sft" and not packed:
            if m is None:
                m = 8 if c.data.variable_seq_lengths else c.data.seq_length
            elif not c.data.variable_seq_lengths:
                m = max(m, c.data.seq_length)  # fixed shape: pad every batch to seq_length
        else:
            m = None
        self.collate = ds.Collator(c.data.seq_length, self.pad_id, m)
        num_eval = sum(len(s) for s in self.eval_sources)
        if c.train.eval_interval and num_eval < c.train.micro_batch_size * self.dp_size:
            raise DataError(
                f"the eval data has {num_eval} rows, fewer than one micro-batch on every "
                f"data-parallel rank ({c.train.micro_batch_size} x {self.dp_size}); give more "
                "eval data (data.split's valid share or data.eval_path) or set "
                "train.eval_interval=0"
            )
        sampler = ds.BlendedSampler(
            [s for _, s in self.train_sources],
            [w for w, _ in self.train_sources],
            c.train.seed,
            c.data.shuffle,
        )
        self.loader = ds.TrainLoader(
            sampler, self.collate, gbs, c.train.micro_batch_size, self.dp_rank, self.dp_size
        )

    # ---- state -----------------------------------------------------------------------------
    def _trainable_keys(self) -> set[str] | None:
        if self.lora_spec is None:
            return None
        return {
            _clean(n)
            for part in self.model_parts
            for n, p in part.named_parameters()
            if p.requires_grad
        }

    def _state(self) -> dict[str, Any]:
        from tunelab.parallel.state import model_state_dict, optimizer_state_dict

        model_sd = model_state_dict(self.opt_parts)
        keep = self._trainable_keys()
        if keep is not None:  # LoRA: the frozen base is not checkpointed
            model_sd = {k: v for k, v in model_sd.items() if k in keep}
        return {
            "model": model_sd,
            "optimizer": optimizer_state_dict(self.opt_parts, self.optimizers),
            "scheduler": self.scheduler.state_dict(),
            "data": self.loader.state_dict(),
            "train": {"step": self.step},
        }

    def _resume(self) -> None:
        from tunelab.parallel.state import load_model_state_dict, load_optimizer_state_dict

        found = self.ckpt.resolve(self.cfg.checkpoint.resume)
        if found is None:
            done = self.ckpt.complete_steps()
            if self.cfg.checkpoint.resume == "never" and done:
                raise CheckpointError(
                    f"checkpoint.resume=never but {self.ckpt.root} already holds checkpoints "
                    f"(up to {done[-1].name}); choose another train.output_dir, delete them, "
                    "or resume with checkpoint.resume=auto"
                )
            return
        state = self._state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            meta = self.ckpt.load(found, state)
        load_model_state_dict(self.opt_parts, state["model"])
        load_optimizer_state_dict(self.opt_parts, self.optimizers, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        self.step = int(state["train"]["step"])
        if self.master is not None:
            self._copy_master_to_model()
        old = meta.get("config", {})
        for sec in ("data", "train"):
            for k, v in old.get(sec, {}).items():
                now = getattr(getattr(self.cfg, sec), k, None)
                if k not in ("steps", "output_dir") and now != v:
                    logger.warning("resuming with %s.%s = %r (checkpoint had %r)", sec, k, now, v)
        logger.info("resumed from %s at step %d", found, self.step)

    def save_checkpoint(self) -> Path:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            return self.ckpt.save(self.step, self._state(), {"config": self.cfg.to_dict()})

    # ---- reductions (no-ops on one process) --------------------------------------------------
    def _global_count(self, n: int) -> float:
        from tunelab.parallel.step import global_count

        dev = self.device if self.device.type == "cuda" else None
        return float(global_count(n, self.mesh, dev))

    def _global_loss(self, local: torch.Tensor) -> float:
        from tunelab.parallel.step import global_loss

        return float(global_loss(local, self.mesh))

    def _any_rank(self, flag: bool) -> bool:
        if not dist.is_initialized():
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ---- one step --------------------------------------------------------------------------
    def _autocast(self):
        # With FSDP (dp > 1) the bf16 compute comes from its mixed-precision policy instead.
        if self.precision == "bf16-mixed" and self.dp_size == 1:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}

    @staticmethod
    def _supervised(mb: dict[str, torch.Tensor]) -> int:
        from tunelab.model.loss import IGNORE_INDEX, shift_labels

        return int((shift_labels(mb["labels"], mb["position_ids"]) != IGNORE_INDEX).sum())

    def _forward_backward(self, micro_batches) -> tuple[float, float, int]:
        """Accumulate gradients; returns (global loss, global supervised tokens, tokens)."""
        n_global = self._global_count(sum(self._supervised(mb) for mb in micro_batches))
        denom = max(n_global, 1.0)
        if self.pipeline is not None:
            from tunelab.parallel.step import forward_backward

            mbs = [self._to_device(mb) for mb in micro_batches]
            with self._autocast():
                local = forward_backward(self.pipeline, mbs, n_global)
            tokens = sum(mb["input_ids"].numel() for mb in mbs)
            return self._global_loss(local), n_global, tokens * self.dp_size
        total = torch.zeros((), dtype=torch.float32, device=self.device)  # no per-batch sync
        tokens = 0
        for mb in micro_batches:
            mb = self._to_device(mb)
            tokens += mb["input_ids"].numel()
            with self._autocast():
                loss_sum, _ = self.model.loss(mb["input_ids"], mb["labels"], mb["position_ids"])
            loss = loss_sum.float() / denom
            loss.backward()
            total += loss.detach().float()
        return self._global_loss(total), n_global, tokens * self.dp_size

    def _copy_master_to_model(self) -> None:
        with torch.no_grad():
            src = dict(self.master.named_parameters())
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(src[n])

    def _clip(self) -> float:
        from tunelab.parallel.grad import clip_grad_norm_, total_grad_norm

        params = [p for part in self.opt_parts for p in part.parameters() if p.requires_grad]
        pp_group, norm_params = None, None
        if self.pipeline is not None:
            pp_group = self.mesh["pp"].get_group()
            norm_params = [p for p in self.pipeline.norm_parameters() if p.requires_grad]
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm > 0:
            return float(clip_grad_norm_(params, max_norm, pp_group, norm_params))
        return float(total_grad_norm(norm_params or params, pp_group))

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip and step; returns (grad norm, whether the update was applied)."""
        if self.master is not None:
            src = dict(self.model.named_parameters())
            for n, p in self.master.named_parameters():
                g = src[n].grad
                p.grad = None if g is None else g.float()
        gnorm = self._clip()
        ok = math.isfinite(gnorm)
        if ok:
            for opt in self.optimizers:
                opt.step()
            if self.master is not None:
                self._copy_master_to_model()
        self._zero_grad()
        return gnorm, ok

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for part in self.model_parts:
            part.zero_grad(set_to_none=True)

    def _non_finite(self, loss: float, gnorm: float) -> None:
        last = self.ckpt.latest()
        raise TrainingError(
            f"step {self.step + 1}: the loss became {loss} (grad norm {gnorm}) at lr "
            f"{self.scheduler.lr:.3g}; stopped without saving this state. The last good "
            f"checkpoint is {last or 'none'}. Lower optim.lr, raise optim.warmup_steps, check "
            "the data, or set train.nan_policy=skip to skip such steps"
        )

    # ---- eval ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, int]:
        """Mean loss per supervised token over the eval split (or train.eval_iters batches)."""
        rounds = ds.eval_batches(
            self.eval_sources,
            self.collate,
            self.cfg.train.micro_batch_size,
            self.cfg.train.eval_iters,
            self.dp_rank,
            self.dp_size,
        )
        if self.pipeline is not None:
            return self._evaluate_pipeline(rounds)
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = 0
        for micro_batches in rounds:
            for mb in micro_batches:
                mb = self._to_device(mb)
                with self._autocast():
                    s, n = self.model.loss(mb["input_ids"], mb["labels"], mb["position_ids"])
                loss_sum += s.double().cpu()
                count += int(n)
        self.model.train()
        if self.mesh is not None:
            from tunelab.parallel.step import reshard

            reshard(self.model)
        total = self._global_loss(loss_sum.float())
        n = self._global_count(count)
        return total / max(n, 1.0), int(n)

    def _evaluate_pipeline(self, rounds) -> tuple[float, int]:
        # The schedule runs exactly n_microbatches micro-batches: evaluate in such groups
        # (a short tail group is left out on every rank alike).
        from tunelab.parallel.step import evaluate

        group_size = self.pipeline.n_microbatches
        groups, cur = [], []
        for micro_batches in rounds:
            cur += micro_batches
            if len(cur) == group_size:
                groups.append(cur)
                cur = []
        total, count = 0.0, 0.0
        for group in groups:
            group = [self._to_device(mb) for mb in group]
            n = self._global_count(sum(self._supervised(mb) for mb in group))
            with self._autocast():
                share = evaluate(self.pipeline, group, n)
            total += self._global_loss(share) * n
            count += n
        return total / max(count, 1.0), int(count)

    # ---- loop ------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._signal is None:
            logger.warning(
                "received %s: saving a checkpoint after this step, then exiting",
                signal.Signals(signum).name,
            )
        self._signal = signum

    def _log_sample(self) -> None:
        if self.tokenizer is None or not self.cfg.logging.log_sample or not self.is_main:
            return
        row = self.loader.sampler[self.loader.consumed_samples]
        text = ds.render_sample(row, self.tokenizer)
        logger.info("training sample (supervised spans in [[ ]]):\n%s", text)

    def _log_memory_estimate(self) -> None:
        """Log tunelab.train.memory's estimate for this process before the first step."""
        if not self.is_main:
            return
        from tunelab.train.memory import estimate_memory, summary

        c = self.cfg
        lora_params = None
        if self.lora_spec is not None:
            lora_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        shards = 1
        if self.mesh is not None:
            shards = self.dims.dp_shard * self.dims.tp * self.dims.pp
        est = estimate_memory(
            self.model_config,
            micro_batch_size=c.train.micro_batch_size,
            seq_length=c.data.seq_length,
            precision=self.precision,
            activation_checkpointing=bool(c.parallel.activation_checkpointing),
            lora_params=lora_params,
            lora_rank=c.lora.r or 16,
            lora_base_dtype=c.lora.base_dtype,
            device_type=self.device.type,
            model_shards=shards,
            tp=self.dims.tp if self.mesh is not None else 1,
        )
        logger.info("%s", summary(est))

    def train(self) -> TrainResult:
        c = self.cfg
        result = TrainResult(last_step=self.step)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", c.to_yaml())
        metrics = MetricsLogger(
            self.out,
            c.train.steps,
            self.step,
            c.logging.interval,
            c.logging.progress,
            c.logging.tensorboard,
            c.logging.plot,
            enabled=self.is_main,
        )
        peak = peak_flops(self.device, c.logging.peak_tflops)
        self._log_memory_estimate()
        self._log_sample()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        skipped_in_row = 0
        if self.step >= c.train.steps:
            logger.info("already at step %d of %d: only exporting", self.step, c.train.steps)
        try:
            while self.step < c.train.steps:
                t0 = time.perf_counter()
                micro_batches = self.loader.next_batch()
                loss, n_tokens, tokens = self._forward_backward(micro_batches)
                finite = math.isfinite(loss)
                gnorm, applied = self._optimizer_step() if finite else (float("nan"), False)
                if not finite or not applied:
                    self._zero_grad()
                    if c.train.nan_policy == "stop":
                        self._non_finite(loss, gnorm)
                    skipped_in_row += 1
                    result.skipped_steps += 1
                    logger.warning(
                        "step %d: non-finite loss %s / grad norm %s: update skipped",
                        self.step + 1,
                        loss,
                        gnorm,
                    )
                    if skipped_in_row > c.train.max_skipped_steps:
                        raise TrainingError(
                            f"{skipped_in_row} steps in a row had a non-finite loss (more than "
                            f"train.max_skipped_steps={c.train.max_skipped_steps}); stopping. "
                            "Lower optim.lr or check the data"
                        )
                else:
                    skipped_in_row = 0
                lr = self.scheduler.lr
                self.scheduler.step()
                self.step += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                tps = tokens / dt if dt > 0 else 0.0
                record = {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "num_supervised_tokens": int(n_tokens),
                    "tokens_per_s": tps,
                    "mfu": None
                    if peak is None
                    else tps * self.flops_per_token / (peak * self.world_size),
                    "memory_gib": memory_gib(self.device),
                    "step_time_s": dt,
                    "skipped": not (finite and applied),
                }
                result.losses[self.step] = loss
                result.last_step = self.step
                metrics.log_step(record)
                for cb in self.callbacks:
                    cb(self, self.step, record)
                if (
                    c.train.eval_interval
                    and self.eval_sources
                    and self.step % c.train.eval_interval == 0
                ):
                    ev, n = self.evaluate()
                    result.eval_losses[self.step] = ev
                    metrics.log_eval(self.step, ev, n)
                stop = self._any_rank(self._signal is not None)
                last = self.step == c.train.steps
                # Never poisoned: a non-finite step either raised above or was not applied.
                if (
                    stop
                    or (c.checkpoint.interval and self.step % c.checkpoint.interval == 0)
                    or (last and c.checkpoint.save_final)
                ):
                    self.save_checkpoint()
                if stop:
                    result.stopped_by_signal = self._signal or signal.SIGTERM
                    logger.warning(
                        "stopped at step %d by a signal; rerun the same command to resume",
                        self.step,
                    )
                    return result
            self._export()
            return result
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            metrics.close()

    # ---- export ------------------------------------------------------------------------------
    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole model as plain CPU tensors on rank 0 (collective; {} on other ranks)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.mesh is None:
            src = self.master if self.master is not None else self.model
            return {_clean(k): v for k, v in src.state_dict().items()}
        if self.pipeline is None:
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=opts)
        # Pipeline: each pp rank gathers its stages (over dp / tp), then rank 0 collects them.
        opts = StateDictOptions(full_state_dict=True, strict=False)
        mine: dict[str, torch.Tensor] = {}
        for part in self.model_parts:
            part_sd = get_model_state_dict(part, options=opts)
            mine.update({k: v.detach().cpu() for k, v in part_sd.items()})
        lead = self.dp_rank == 0 and self.mesh["tp"].get_local_rank() == 0
        gathered: list[dict] | None = [{} for _ in range(self.world_size)] if self.is_main else None
        dist.gather_object(mine if lead else {}, gathered, dst=0)
        out: dict[str, torch.Tensor] = {}
        for sd in gathered or []:
            out.update(sd)
        return out

    def _export(self) -> None:
        c = self.cfg
        if self.lora_spec is not None:
            from tunelab.model.lora import lora_state_dict, save_peft_adapter
            from tunelab.model.lora_peft import write_peft_adapter

            adapter_dir = self.out / "adapter"
            if self.mesh is None:
                save_peft_adapter(
                    self.model,
                    self.lora_spec,
                    adapter_dir,
                    base_model_name_or_path=c.model.path,
                    tokenizer_dir=self.tokenizer_dir,
                )
            else:  # lora_state_dict gathers sharded adapters: every rank takes part
                from tunelab.model.lora import lora_layers
                from tunelab.model.lora_peft import peft_config_dict, peft_target_modules

                state = lora_state_dict(self.model)
                if self.is_main:
                    layers = lora_layers(self.model)
                    targets = peft_target_modules(self.model, list(layers))
                    config = peft_config_dict(self.lora_spec, targets, c.model.path, layers)
                    write_peft_adapter(state, config, adapter_dir, self.tokenizer_dir)
        if not c.export_hf():
            return
        from tunelab.model.hf import save_hf

        state = self._full_state()
        if not self.is_main:
            return
        if self.lora_spec is not None:  # hf/ of the base model, adapters left out
            state = {k: v for k, v in state.items() if ".lora_" not in k}
        dtype = c.model.export_dtype
        if dtype == "auto":
            dtype = self.model_config.torch_dtype or "float32"
        save_hf(
            state, self.model_config, self.out / "hf", dtype=dtype, tokenizer_dir=self.tokenizer_dir
        )
        logger.info("exported %s", self.out / "hf")
