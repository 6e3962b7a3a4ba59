"""Batched decoding for the shared decoder: greedy, beam search, top-k/top-p sampling.

Prompts are left-padded so every row's next token sits in the last column. With ``use_cache=True`` the
decoder keeps keys/values of past positions and projects the fused memory once; with ``use_cache=False``
it re-runs the whole sequence every step (the reference the cached path is tested against, and what
open_clip's CoCa does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmstory.decoder import LAST, TextDecoder


@dataclass
class DecodeOptions:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens already generated (CTRL's rule)
    length_penalty: float = 1.0      # beam score = sum log p / length ** length_penalty
    seed: int | None = None
    use_cache: bool = True


class _Stepper:
    """Feeds the decoder one new token per row per step, with or without the KV cache."""

    def __init__(self, decoder: TextDecoder, memory, memory_mask, use_cache: bool, copy_ids=None):
        self.decoder, self.memory, self.memory_mask, self.copy_ids = decoder, memory, memory_mask, copy_ids
        self.cache = decoder.new_cache() if use_cache else None

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.ids, self.mask = ids, mask
        self.positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # left padding: real tokens from 0
        return self.decoder(ids, self.memory, self.memory_mask, positions=self.positions, key_mask=mask,
                            cache=self.cache, select=LAST, copy_ids=self.copy_ids)

    def step(self, new: torch.Tensor) -> torch.Tensor:
        """new (B, 1) -> next-token logits (B, V)."""
        pos = self.positions[:, -1:] + 1
        self.ids = torch.cat([self.ids, new], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(new, dtype=torch.bool)], 1)
        self.positions = torch.cat([self.positions, pos], 1)
        if self.cache is not None:
            return self.decoder(new, self.memory, self.memory_mask, positions=pos, key_mask=self.mask,
                                cache=self.cache, select=LAST, copy_ids=self.copy_ids)
        return self.decoder(self.ids, self.memory, self.memory_mask, positions=self.positions, key_mask=self.mask,
                            select=LAST, copy_ids=self.copy_ids)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows in ``index`` (beam search's surviving beams). Beam search only moves beams within
        their own input's group of rows, which all share one memory, so the memory and the
        cross-attention caches (projected memory) stay as they are: selecting them would only copy
        identical rows (a sixth of beam-4 decoding time on CPU)."""
        self.ids, self.mask, self.positions = self.ids[index], self.mask[index], self.positions[index]
        for self_cache, _ in self.cache or []:
            self_cache.reorder(index)


def process_logits(logits: torch.Tensor, generated: torch.Tensor, step: int, eos_id: int,
                   opts: DecodeOptions) -> torch.Tensor:
    """Repetition penalty, minimum length, temperature, top-k and top-p on (B, V) logits."""
    logits = logits.float()
    if opts.repetition_penalty != 1.0 and generated.numel():
        seen = logits.gather(1, generated)
        seen = torch.where(seen > 0, seen / opts.repetition_penalty, seen * opts.repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if step < opts.min_new_tokens:
        logits[:, eos_id] = float("-inf")
    if opts.do_sample:
        logits = logits / max(opts.temperature, 1e-6)
        if opts.top_k > 0:
            kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if opts.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            remove = probs.cumsum(-1) - probs > opts.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


@torch.no_grad()
def generate(decoder: TextDecoder, memory: torch.Tensor, memory_mask: torch.Tensor | None, prompt_ids: torch.Tensor,
             prompt_mask: torch.Tensor, *, eos_id: int, pad_id: int, opts: DecodeOptions | None = None,
             copy_ids: torch.Tensor | None = None) -> list[list[int]]:
    """memory (B, M, D), prompt_ids/mask (B, P) left-padded -> generated ids per row (EOS excluded).
    ``copy_ids`` (B, C): the token ids the last C memory tokens stand for (a decoder with a copy head)."""
    opts = opts or DecodeOptions()
    if prompt_ids.shape[1] + opts.max_new_tokens > decoder.max_len:
        raise ValueError(f"prompt ({prompt_ids.shape[1]} tokens) + max_new_tokens ({opts.max_new_tokens}) "
                         f"exceeds the decoder's max_len {decoder.max_len}")
    if opts.num_beams > 1:
        if opts.do_sample:
            raise ValueError("beam search with sampling is not supported; set num_beams=1 or do_sample=False")
        return _beam_search(decoder, memory, memory_mask, prompt_ids, prompt_mask, eos_id, opts, copy_ids)
    generator = None
    if opts.do_sample and opts.seed is not None:
        generator = torch.Generator(device=memory.device).manual_seed(opts.seed)
    stepper = _Stepper(decoder, memory, memory_mask, opts.use_cache, copy_ids)
    logits = stepper.start(prompt_ids, prompt_mask)
    B = prompt_ids.shape[0]
    out = torch.empty(B, 0, dtype=torch.long, device=memory.device)
    finished = torch.zeros(B, dtype=torch.bool, device=memory.device)
    for t in range(opts.max_new_tokens):
        logits = process_logits(logits, out, t, eos_id, opts)
        if opts.do_sample:
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(finished, pad_id)
        out = torch.cat([out, nxt[:, None]], 1)
        finished |= nxt == eos_id
        if bool(finished.all()) or t == opts.max_new_tokens - 1:
            break
        logits = stepper.step(nxt[:, None])
    return [_until_eos(row, eos_id) for row in out.tolist()]


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _beam_search(decoder, memory, memory_mask, prompt_ids, prompt_mask, eos_id, opts: DecodeOptions, copy_ids=None):
    """Standard beam search. Finished hypotheses score sum(log p) / length ** length_penalty (length
    counts generated tokens incl. EOS). A row is done once it has ``num_beams`` finished hypotheses and
    its best live beam, scored at the current length, cannot beat the worst of them — so width 1
    stops exactly where greedy decoding stops."""
    K, B = opts.num_beams, prompt_ids.shape[0]
    expand = torch.arange(B, device=memory.device).repeat_interleave(K)
    stepper = _Stepper(decoder, memory[expand], None if memory_mask is None else memory_mask[expand], opts.use_cache,
                       None if copy_ids is None else copy_ids[expand])
    logits = stepper.start(prompt_ids[expand], prompt_mask[expand])
    scores = torch.full((B, K), float("-inf"), device=memory.device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    seqs = torch.empty(B * K, 0, dtype=torch.long, device=memory.device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(opts.max_new_tokens):
        logp = process_logits(logits, seqs, t, eos_id, opts).log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]
        # The 2K best continuations of a row are among the 2K best tokens of each of its beams: take those
        # first, then add the beam scores to (B*K, 2K) candidates instead of to the whole (B*K, V).
        top_logp, top_tok = logp.topk(min(2 * K, V), dim=-1)
        cand = scores.view(-1, 1) + top_logp
        top_scores, flat = cand.view(B, -1).topk(2 * K, dim=1)  # over each row's K * 2K candidates
        beam_of = flat // top_tok.shape[1]
        top_idx = beam_of * V + top_tok.view(B, -1).gather(1, flat)  # as an index into the (K, V) grid
        next_beam, next_tok, next_score = [], [], []
        for b in range(B):
            chosen = []
            for s, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, tok = divmod(idx, V)
                if done[b]:
                    chosen.append((0.0, 0, eos_id))
                elif tok == eos_id:
                    if s > float("-inf"):
                        hyp = seqs[b * K + beam].tolist()
                        finished[b].append((s / (t + 1) ** opts.length_penalty, hyp))
                else:
                    chosen.append((s, beam, tok))
                if len(chosen) == K:
                    break
            while len(chosen) < K:  # only when every candidate was EOS/-inf
                chosen.append((float("-inf"), 0, eos_id))
            for s, beam, tok in chosen:
                next_score.append(s)
                next_beam.append(b * K + beam)
                next_tok.append(tok)
            if not done[b] and len(finished[b]) >= K:
                finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
                best_live = max(s for s, _, _ in chosen) / (t + 1) ** opts.length_penalty
                done[b] = best_live <= finished[b][-1][0]
        index = torch.tensor(next_beam, device=memory.device)
        toks = torch.tensor(next_tok, device=memory.device)
        scores = torch.tensor(next_score, device=memory.device).view(B, K)
        seqs = torch.cat([seqs[index], toks[:, None]], 1)
        if all(done) or t == opts.max_new_tokens - 1:
            break
        stepper.reorder(index)
        logits = stepper.step(toks[:, None])
    results = []
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:  # ran out of length: live beams compete too
            length = seqs.shape[1]
            hyps += [(scores[b, k].item() / length ** opts.length_penalty, seqs[b * K + k].tolist())
                     for k in range(K) if scores[b, k] > float("-inf")]
        best = max(hyps, key=lambda h: h[0])[1] if hyps else []
        results.append(_until_eos(best, eos_id))
    return results
