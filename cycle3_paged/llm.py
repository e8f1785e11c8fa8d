"""The engine: load a model, then generate with static batches over a paged KV cache.

The KV cache is one pool of fixed-size blocks allocated at start-up. A sequence takes blocks as it
grows (a new one only when its last block is full) and returns them the moment it finishes, so the
memory held follows the tokens actually stored instead of a worst-case reservation.

Batching is still static: requests are taken in order into groups of up to `max_num_seqs` whose
worst case fits the pool (without preemption, a group must never run out of blocks midway), and
the next group starts only after the slowest member of this one finishes.
"""

import time

import torch
from tqdm import tqdm

from common.engine.inputs import prepare_requests
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, resolve_model
from common.engine.outputs import RequestMetrics, RequestOutput

from .block_manager import BlockManager
from .config import Config
from .model_runner import ModelRunner
from .sampling_params import SamplingParams
from .sequence import Sequence, SequenceStatus


class LLM:
    def __init__(self, model: str, **options):
        self.config = config = Config(model, **options)    # every option checked before any loading
        self.device, self.dtype = config.device, config.dtype
        self.source = resolve_model(config.model, config.weights)
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        self.model_runner = ModelRunner(config, self.source, self.eos_token_ids)
        self.block_manager = BlockManager(self.model_runner.num_kv_blocks, config.block_size)
        self.stats: dict = {}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        requests = self._prepare(prompts, sampling_params)
        seqs = [Sequence(i, r.prompt, r.prompt_token_ids, r.sampling_params,
                         _request_generator(r.sampling_params.seed, self.device)) for i, r in enumerate(requests)]
        self.block_manager.check_fits([s.max_len for s in seqs])  # before any work: a refusal leaves the engine as it was
        reset_peak_memory(self.device)
        start = time.perf_counter()
        self._peak_blocks, self._tokens_at_peak = 0, 0
        self._step_times = []
        bar = tqdm(total=len(seqs), disable=not use_tqdm, desc="requests")
        for group in self._groups(seqs):
            self._run_group(group, start)
            bar.update(len(group))
        bar.close()
        self.stats = self._stats(seqs, time.perf_counter() - start)
        return [self._output(seq) for seq in seqs]

    # --- helpers -------------------------------------------------------------------------------

    def _prepare(self, prompts, sampling_params):
        hf = self.source.config
        return prepare_requests(prompts, sampling_params, self.tokenizer, hf.vocab_size,
                                hf.max_position_embeddings, SamplingParams)

    def _groups(self, seqs: list[Sequence]):
        """Static batches, in order: up to max_num_seqs requests whose worst case fits the pool together."""
        group, worst = [], 0
        for seq in seqs:
            need = self.block_manager.blocks_for(seq.max_len)
            if group and (len(group) == self.config.max_num_seqs or worst + need > self.block_manager.num_blocks):
                yield group
                group, worst = [], 0
            group.append(seq)
            worst += need
        if group:
            yield group

    def _run_group(self, group: list[Sequence], start: float) -> None:
        for seq in group:
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
        live, is_prefill = group, True
        last = time.perf_counter() - start
        while live:
            # Prefill: the prompts once. Decode: only the unfinished sequences run (their cache is
            # paged, not one batch tensor); still no new request joins until the whole group is done.
            self._track_peak(live)
            out = self.model_runner.run(live, is_prefill)
            now = time.perf_counter() - start
            self._step_times.append([max(len(s) for s in live), now - last])
            last = now
            self._postprocess(live, out, now)
            live, is_prefill = [s for s in live if not s.is_finished], False
            for seq in live:
                self.block_manager.append_slot(seq)

    def _postprocess(self, seqs: list[Sequence], out, now: float) -> None:
        for i, (seq, token) in enumerate(zip(seqs, out.token_ids)):
            seq.token_ids.append(token)
            seq.record_logprobs(out, i)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._finish_reason(seq.output_token_ids, seq.sampling_params)
            if reason:
                seq.finish_reason, seq.finish_time = reason, now
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)

    def _finish_reason(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if token_ids[-1] in params.stop_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _track_peak(self, live: list[Sequence]) -> None:
        """The most blocks held at once, and the tokens they held then (utilization at the peak)."""
        used = self.block_manager.num_used_blocks
        if used > self._peak_blocks:
            self._peak_blocks, self._tokens_at_peak = used, sum(len(s) for s in live)

    def _stats(self, seqs: list[Sequence], wall: float) -> dict:
        """The components' own stats, and the loop's."""
        return {
            **self.model_runner.stats(), **self.block_manager.stats(),
            "kv_cache_peak_bytes": self._peak_blocks * self.model_runner.kv_cache.bytes_per_block,
            "kv_block_utilization": self._tokens_at_peak / max(1, self._peak_blocks * self.block_manager.block_size),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "output_tokens": sum(len(s.output_token_ids) for s in seqs),
            "wall_s": wall,
            "max_num_seqs": self.config.max_num_seqs,
            "step_times": self._step_times,  # [tokens of the longest sequence in the step, seconds], per step
        }

    def _output(self, seq: Sequence) -> RequestOutput:
        tokens = seq.output_token_ids
        return RequestOutput(seq.seq_id, seq.prompt, seq.token_ids[:seq.num_prompt_tokens], tokens,
                             self.tokenizer.decode(tokens, skip_special_tokens=seq.sampling_params.skip_special_tokens),
                             seq.finish_reason,
                             RequestMetrics(seq.first_token_time, seq.finish_time),
                             logprobs=seq.logprobs, prompt_logprobs=seq.prompt_logprobs)


def _request_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
