"""The engine: load a model, then generate with static batches and no KV cache.

Requests are taken in fixed groups of `max_num_seqs`. A group is left-padded into one [B, T] batch
and every step reruns the model over every token of every unfinished sequence, keeping only the
last position's logits: step n costs O(n) tokens, so a whole generation costs O(n^2). The next
group starts only after the slowest member of this one finishes.
"""

import time

from tqdm import tqdm

from common.engine.inputs import prepare_requests
from common.engine.memory import check_static_batch, static_batch_bytes, weight_bytes
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, resolve_model
from common.engine.outputs import RequestOutput

from .config import Config
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .sampling_params import SamplingParams
from .sequence import Sequence, SequenceStatus, request_generator


class LLM:
    def __init__(self, model: str, **options):
        self.config = config = Config(model, **options)    # every option checked before any loading
        self.device, self.dtype = config.device, config.dtype
        self.source = resolve_model(config.model, config.weights)
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = set(eos_token_ids(self.source, self.tokenizer))
        self.model_runner = ModelRunner(config, self.source, self.eos_token_ids)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self.stats: dict = {}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        hf = self.source.config
        requests = prepare_requests(prompts, sampling_params, self.tokenizer, hf.vocab_size,
                                    hf.max_position_embeddings, SamplingParams)
        start = time.perf_counter()
        seqs = [Sequence(i, r.prompt, r.prompt_token_ids, r.sampling_params,
                         request_generator(r.sampling_params.seed, self.device), start)
                for i, r in enumerate(requests)]
        memory = self._check_memory(seqs)  # before any work: a refusal leaves the engine as it was
        for seq in seqs:   # text is decoded once, at the end (token by token only for stop strings)
            self.output_processor.add(seq, stream=False)
        reset_peak_memory(self.device)
        self._step_times = []
        outputs = {}
        with tqdm(total=len(seqs), disable=not use_tqdm, desc="requests") as bar:
            for group in self._groups(seqs):
                outputs.update((o.request_id, o) for o in self._run_group(group))
                bar.update(len(group))
        self.stats = {**self._stats(seqs, time.perf_counter() - start), **memory}
        return [outputs[seq.seq_id] for seq in seqs]

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

    def _run_group(self, group: list[Sequence]) -> list[RequestOutput]:
        for seq in group:
            seq.status = SequenceStatus.RUNNING
        live = group
        last, finished = time.perf_counter(), []
        while live:
            # A finished sequence leaves the batch, but its slot stays empty: no new request joins
            # until the whole group is done. That is static batching.
            out = self.model_runner.run(live)
            now = time.perf_counter()
            self._step_times.append([max(len(s) for s in live), now - last])
            last = now
            finished += self._postprocess(live, out, now)
            live = [s for s in live if not s.is_finished]
        return finished

    def _postprocess(self, seqs: list[Sequence], out, now: float) -> list[RequestOutput]:
        """Every sequence takes its sampled token; returns the outputs of those that finished."""
        finished = []
        for i, seq in enumerate(seqs):
            output = self.output_processor.process(seq, out, i, now)
            if output.finished:
                seq.status = SequenceStatus.FINISHED
                finished.append(output)
        return finished

    def _stats(self, seqs: list[Sequence], wall: float) -> dict:
        """The components' own stats, and the loop's."""
        return {
            **self.model_runner.stats(),
            "kv_cache_peak_bytes": 0,  # no cache: K and V are recomputed every step
            "peak_memory_bytes": peak_memory_bytes(self.device), "wall_s": wall,
            "output_tokens": sum(len(s.output_token_ids) for s in seqs), "max_num_seqs": self.config.max_num_seqs,
            "step_times": self._step_times,  # [tokens of the longest sequence in the step, seconds], per step
        }
