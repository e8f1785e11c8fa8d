"""The engine: load a model, then generate with static batches and no KV cache.

Requests are taken in fixed groups of `max_num_seqs`. A group is left-padded into one [B, T] batch
and every step reruns the model over every token of every sequence, keeping only the last
position's logits: step n costs O(n) tokens, so a whole generation costs O(n^2). The next group
starts only after the slowest member of this one finishes.
"""

import time

import torch
from tqdm import tqdm

from common.engine.inputs import prepare_requests
from common.engine.memory import check_static_batch, static_batch_bytes, weight_bytes
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, resolve_model
from common.engine.outputs import RequestMetrics, RequestOutput

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
        self.stats: dict = {}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        requests = self._prepare(prompts, sampling_params)
        seqs = [Sequence(i, r.prompt, r.prompt_token_ids, r.sampling_params,
                         _request_generator(r.sampling_params.seed, self.device)) for i, r in enumerate(requests)]
        memory = self._check_memory(seqs)  # before any work: a refusal leaves the engine as it was
        reset_peak_memory(self.device)
        start = time.perf_counter()
        self._step_times = []
        bar = tqdm(total=len(seqs), disable=not use_tqdm, desc="requests")
        for group in self._groups(seqs):
            self._run_group(group, start)
            bar.update(len(group))
        bar.close()
        self.stats = {**self._stats(seqs, time.perf_counter() - start), **memory}
        return [self._output(seq) for seq in seqs]

    # --- helpers -------------------------------------------------------------------------------

    def _prepare(self, prompts, sampling_params):
        hf = self.source.config
        return prepare_requests(prompts, sampling_params, self.tokenizer, hf.vocab_size,
                                hf.max_position_embeddings, SamplingParams)

    def _check_memory(self, seqs: list[Sequence]) -> dict:
        """Estimate the peak of the largest static group and refuse the call if it cannot fit.

        No block pool bounds a static batch: its longest sequence decides what it allocates. The
        batch size is this engine's lesson, so a batch that does not fit is refused, never shrunk.
        """
        worst = None
        for group in self._groups(seqs):
            longest = max(s.num_prompt_tokens for s in group)
            largest = max(s.sampling_params.max_tokens for s in group)
            seq_len, kv_tokens = longest + largest - 1, 0   # the last step reruns every token; no cache
            need = static_batch_bytes(self.source.config, len(group), seq_len, self.dtype, kv_tokens)
            if worst is None or need["total"] > worst[0]["total"]:
                worst = (need, dict(batch=len(group), seq_len=seq_len, longest_prompt=longest,
                                    largest_max_tokens=largest))
        need, shape = worst
        return check_static_batch(need, weight_bytes(self.model_runner.model), self.device,
                                  max_num_seqs=self.config.max_num_seqs, **shape)

    def _groups(self, seqs: list[Sequence]):
        """Static batches, in order: max_num_seqs requests at a time."""
        for first in range(0, len(seqs), self.config.max_num_seqs):
            yield seqs[first:first + self.config.max_num_seqs]

    def _run_group(self, group: list[Sequence], start: float) -> None:
        for seq in group:
            seq.status = SequenceStatus.RUNNING
        live = group
        last = time.perf_counter() - start
        while live:
            # Every row runs every step, finished or not: that is static batching.
            out = self.model_runner.run(group)
            now = time.perf_counter() - start
            self._step_times.append([max(len(s) for s in group), now - last])
            last = now
            self._postprocess(group, out, now)
            live = [s for s in group if not s.is_finished]

    def _postprocess(self, seqs: list[Sequence], out, now: float) -> None:
        for i, (seq, token) in enumerate(zip(seqs, out.token_ids)):
            if seq.is_finished:   # its row ran with the others; the token is dropped
                continue
            seq.token_ids.append(token)
            seq.record_logprobs(out, i)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._finish_reason(seq.output_token_ids, seq.sampling_params)
            if reason:
                seq.finish_reason, seq.finish_time = reason, now
                seq.status = SequenceStatus.FINISHED

    def _finish_reason(self, token_ids: list[int], params: SamplingParams) -> str | None:
        if not params.ignore_eos and token_ids[-1] in self.eos_token_ids:
            return "stop"
        if token_ids[-1] in params.stop_token_ids:
            return "stop"
        if len(token_ids) >= params.max_tokens:
            return "length"
        return None

    def _stats(self, seqs: list[Sequence], wall: float) -> dict:
        """The components' own stats, and the loop's."""
        return {
            **self.model_runner.stats(),
            "kv_cache_peak_bytes": 0,  # no cache: K and V are recomputed every step
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "output_tokens": sum(len(s.output_token_ids) for s in seqs),
            "wall_s": wall,
            "max_num_seqs": self.config.max_num_seqs,
            "step_times": self._step_times,  # [tokens per sequence in the step, seconds], per step
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
