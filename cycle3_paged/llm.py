"""The engine: load a model, then generate with static batches over a paged KV cache.

The KV cache is one pool of fixed-size blocks allocated at start-up. A sequence takes blocks as it
grows (a new one only when its last block is full) and returns them the moment it finishes, so the
memory held follows the tokens actually stored instead of a worst-case reservation. Batching is
still static: groups of up to `max_num_seqs` requests, in order, whose worst case fits the pool
(with no preemption, a group must never run out of blocks midway), the next after the slowest ends.
"""

import time

from tqdm import tqdm

from common.engine.inputs import prepare_requests
from common.engine.metrics import peak_memory_bytes, reset_peak_memory
from common.engine.model_source import eos_token_ids, load_tokenizer, resolve_model
from common.engine.outputs import RequestOutput

from .block_manager import BlockManager
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
        self.block_manager = BlockManager(self.model_runner.num_kv_blocks, config.block_size)
        self.stats: dict = {}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        hf = self.source.config
        requests = prepare_requests(prompts, sampling_params, self.tokenizer, hf.vocab_size,
                                    hf.max_position_embeddings, SamplingParams)
        start = time.perf_counter()
        seqs = [Sequence(i, r.prompt, r.prompt_token_ids, r.sampling_params,
                         request_generator(r.sampling_params.seed, self.device), start)
                for i, r in enumerate(requests)]
        self.block_manager.check_fits([s.max_len for s in seqs])  # before any work: a refusal leaves the engine as it was
        for seq in seqs:   # text is decoded once, at the end (token by token only for stop strings)
            self.output_processor.add(seq, stream=False)
        reset_peak_memory(self.device)
        self._peak_blocks, self._tokens_at_peak = 0, 0
        self._step_times = []
        outputs = {}
        with tqdm(total=len(seqs), disable=not use_tqdm, desc="requests") as bar:
            for group in self._groups(seqs):
                outputs.update((o.request_id, o) for o in self._run_group(group))
                bar.update(len(group))
        self.stats = self._stats(seqs, time.perf_counter() - start)
        return [outputs[seq.seq_id] for seq in seqs]

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

    def _run_group(self, group: list[Sequence]) -> list[RequestOutput]:
        for seq in group:
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
        live, is_prefill = group, True
        last, finished = time.perf_counter(), []
        while live:
            # A finished sequence leaves the batch, but its slot stays empty: no new request joins
            # until the whole group is done. That is static batching.
            self._track_peak(live)
            out = self.model_runner.run(live, is_prefill)
            now = time.perf_counter()
            self._step_times.append([max(len(s) for s in live), now - last])
            last = now
            finished += self._postprocess(live, out, now)
            live, is_prefill = [s for s in live if not s.is_finished], False
            for seq in live:
                self.block_manager.append_slot(seq)
        return finished

    def _postprocess(self, seqs: list[Sequence], out, now: float) -> list[RequestOutput]:
        """Every sequence takes its sampled token; returns the outputs of those that finished."""
        finished = []
        for i, seq in enumerate(seqs):
            output = self.output_processor.process(seq, out, i, now)
            if output.finished:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                finished.append(output)
        return finished

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
            "peak_memory_bytes": peak_memory_bytes(self.device), "wall_s": wall,
            "output_tokens": sum(len(s.output_token_ids) for s in seqs), "max_num_seqs": self.config.max_num_seqs,
            "step_times": self._step_times,  # [tokens of the longest sequence in the step, seconds], per step
        }
