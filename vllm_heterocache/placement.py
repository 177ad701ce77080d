"""Where a compressed head's tokens live in its KV cache, for one request. Pure arithmetic.

vLLM's prefix cache shares a prompt's KV blocks between requests by the hash of the tokens they
hold. A compressed head keeps its own selection of the prompt's tokens, which depends on the
request (on its question, for scored policies), so a selection must never be written into a
block that the prefix cache can hand to another request. Each compressed pool therefore lays a
request's block-table row out in two regions (columns of ``block_size`` tokens)::

    | prompt: P = ceil(L / bs) columns | selection: N slots, then generated tokens ...
      positions 0 .. L-1, shared         private, never hashed: token p >= L at p + shift

- *prompt*: the prompt's tokens at their own positions, written while the prompt is prefilled
  and never afterwards. vLLM hashes and shares these blocks like any other pool's: a prefix-cache
  hit fills them, and the prompt's own blocks serve later requests' hits.
- *private*: once the prompt is processed, each head of the pool copies the prompt tokens it
  keeps into slots ``0 ..`` of this region (row positions ``selection_start ..``), in prompt
  order; drift refills rewrite the same slots. ``N`` slots hold the most any head of the pool
  copies; the generated tokens follow at once (``shift = selection_start + N - L``), so that a
  short answer shares a block with the selection. The scheduler allocates the region's first
  blocks with the prompt's last block and never hashes any of it, so the prefix cache never sees
  a selection (nor, in these pools, a generated token: a chat's next turn hits its previous
  turn's prompt, and computes the answer again).

When the prompt is processed the scheduler releases the prompt columns: their blocks stay in
vLLM's prefix cache (evictable, intact) for later requests, and the request keeps its private
region, ``N = B_max`` slots for its selection (``B_max``: the pool's largest budget for the
request) and its generated tokens -- the same device memory as without prefix caching.

A request whose first ``H`` prompt tokens came from the prefix cache (``H`` a whole number of
blocks: other requests' blocks, which this one shares through their reference counts) keeps
those ``H / bs`` *shared* columns instead of releasing them: its heads' selections point into
them (a head's selected positions below ``H`` are read in place, ``RequestState.fronts``) and
only the tokens it selects from its own part of the prompt are copied, into ``N = min(B_max, L -
H)`` slots. Requests that share a long prefix thus hold it once, as the stock backend does,
never a copy of their selections of it each.

A pool whose heads all keep every prompt token for the request (its policy keeps them full,
ratio 1, a short prompt) is laid out like a full pool: every token at its own position, nothing
copied or released. So is a request with a hit whose own part of the prompt is no longer than
its selection region would be (``L - H <= B_max``, a question after a shared document): it keeps
its own prompt blocks too, its heads point at what they select anywhere in the prompt, and its
generated tokens follow at their own positions -- no more memory than copying, none of it at
once, and nothing copied.

The scheduler (``vllm_adapter.pools``) sizes and frees blocks by this module and the workers
(``runtime``) address tokens by it, so both sides agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class RowPlacement:
    """One request's row in one compressed pool (module docstring).

    Attributes:
        prompt_len: L, the request's prompt tokens.
        block_size: bs, tokens per block.
        selection_len: N, the private region's selection slots; 0: every token at its own
            position (no private region).
        shared_blocks: prompt blocks from a prefix-cache hit that the selections point into.
    """

    prompt_len: int
    block_size: int
    selection_len: int
    shared_blocks: int = 0

    @classmethod
    def of(cls, prompt_len: int, block_size: int, max_budget: int, keeps_prompt: bool, hit: int = 0) -> RowPlacement:
        """The placement of a pool whose largest budget for this request is ``max_budget`` tokens;
        ``keeps_prompt``: every head of the pool keeps every prompt token (no selection); ``hit``:
        the request's prompt tokens from the prefix cache (a whole number of blocks)."""
        shared = hit // block_size
        own = prompt_len - shared * block_size  # the prompt tokens the request computed itself
        if keeps_prompt or shared and own <= max_budget:
            return cls(prompt_len, block_size, 0)  # every token in place
        return cls(prompt_len, block_size, min(max_budget, own), shared)

    @property
    def positional(self) -> bool:
        """Every token at its own position (no private region)."""
        return self.selection_len == 0

    @property
    def prompt_blocks(self) -> int:
        """P: columns of the prompt region."""
        return _cdiv(self.prompt_len, self.block_size)

    @property
    def shared_len(self) -> int:
        """H: prompt positions below it are read in place (shared blocks), not copied."""
        return self.shared_blocks * self.block_size

    @property
    def released(self) -> range:
        """The prompt columns released once the prompt is processed."""
        return range(0 if self.positional else self.shared_blocks, 0 if self.positional else self.prompt_blocks)

    @property
    def selection_start(self) -> int:
        """Row position of selection slot 0 (the private region's first)."""
        return self.prompt_blocks * self.block_size

    @property
    def shift(self) -> int:
        """Row positions a generated token sits after its own position (0 when positional)."""
        return 0 if self.positional else self.selection_start + self.selection_len - self.prompt_len

    @property
    def peak_blocks(self) -> int:
        """The most blocks the request holds at once before it generates: its prompt and its
        selection, at the step of the prompt's last chunk (the prompt's blocks are released
        afterwards). A longer prompt never has a smaller peak."""
        return self.prompt_blocks + _cdiv(self.selection_len, self.block_size)

    def blocks_for(self, num_tokens: int) -> int:
        """Block-table columns a request needs once tokens ``0 .. num_tokens - 1`` have slots.

        The selection's blocks come with the chunk that reaches the prompt's last block, so that
        the chunk with the last prompt token can select into them."""
        if self.positional or num_tokens <= (self.prompt_len - 1) // self.block_size * self.block_size:
            return _cdiv(num_tokens, self.block_size)
        if num_tokens <= self.prompt_len:
            return self.peak_blocks
        return _cdiv(self.row_position(num_tokens - 1) + 1, self.block_size)

    @staticmethod
    def max_row_blocks(max_len: int, block_size: int) -> int:
        """The most block-table columns any request's row can need, whatever its placement: a
        prompt of up to ``max_len`` tokens, a selection region of up to its whole prompt (a
        request's own policy or ratio may keep every prompt token of a head, which it then
        copies), the generated tokens after it, and one column to spare."""
        return 2 * _cdiv(max_len, block_size) + 1

    def row_position(self, position: int) -> int:
        """Where token ``position`` of the request sits in the row."""
        return position + self.shift if position >= self.prompt_len else position

    def token_block_columns(self, num_blocks: int) -> list[int]:
        """The columns of token blocks ``0 .. num_blocks - 1`` that the prefix cache hashes:
        every one at its own column in a positional row, else the prompt's whole blocks."""
        if self.positional:
            return list(range(num_blocks))
        return list(range(min(num_blocks, self.prompt_len // self.block_size)))
