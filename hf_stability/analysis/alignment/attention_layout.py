"""How the permutation of an attention group is laid out over its slots.

An attention group has ``kv_heads`` key/value heads (G), each read by ``r = num_heads / G``
query heads (r = 1 without grouped-query attention). Its whole symmetry is:

- ``kv``: the key/value heads relabelled as wholes, each with its query heads;
- ``query``: inside each key/value group, its r query heads relabelled among themselves;
- ``within["qk"]``: inside each key/value group, one permutation of the query/key dimensions
  (shared by its key head and its r query heads, so that every score q.k is unchanged); the
  first ``fixed_qk`` dimensions of a head do not move (rotary dimensions: each is rotated at
  its own frequency, so no permutation of them keeps the scores);
- ``within["v"]``: inside each key/value group, one permutation of the value dimensions
  (shared by its value head and the output-projection columns of its r query heads).

A slot's ``kind`` says which of these act on it and how its units are ordered:

| kind | units | moved by |
|---|---|---|
| ``qk`` | (key/value head g, dim i) | kv, within["qk"] (keys; queries too when r = 1) |
| ``q`` | (g, query head j, dim i) | kv, query, within["qk"] |
| ``v`` | (g, dim i) | kv, within["v"] (values; output columns too when r = 1) |
| ``o`` | (g, j, dim i) | kv, query, within["v"] (output-projection columns) |
| ``head`` | (g, j) | kv, query (per-head tables: relative position biases) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ArchitectureMismatchError

# kind -> (indexed by query head, the within-head permutation it shares)
SLOT_KINDS: dict[str, tuple[bool, str | None]] = {
    "qk": (False, "qk"), "q": (True, "qk"), "v": (False, "v"), "o": (True, "v"), "head": (True, None),
}


@dataclass
class HeadPermutation:
    """The parameters of one attention group's permutation (row g = head g of the permuted model)."""

    kv: torch.Tensor  # [G]: key/value head g of the permuted model is head kv[g] of the original
    query: torch.Tensor  # [G, r]: query head j of group g is query head query[g, j] of group kv[g]
    within: dict[str, torch.Tensor]  # tie -> [G, d]: dim i of group g is dim within[g, i] of group kv[g]


def compose(group, hp: HeadPermutation) -> dict[str, torch.Tensor]:
    """The slot permutations of ``group`` from its head permutation."""
    g, r = group.key_value_heads, group.queries_per_kv
    perm = {}
    for slot in group.slots:
        per_query, tie = SLOT_KINDS[slot.kind]
        copies, unit = (r if per_query else 1), group.unit(slot)
        block = hp.kv.view(g, 1) * copies + (hp.query if per_query else torch.zeros(g, 1, dtype=torch.long))
        inner = hp.within[tie].view(g, 1, unit) if tie else torch.zeros(g, 1, 1, dtype=torch.long)
        perm[slot.name] = (block.view(g, copies, 1) * unit + inner).reshape(-1)
    return perm


def random_head_permutation(group, generator: torch.Generator | None = None) -> HeadPermutation:
    """A uniformly random element of the group's symmetry."""
    g, r = group.key_value_heads, group.queries_per_kv
    kv = torch.randperm(g, generator=generator)
    query = torch.stack([torch.randperm(r, generator=generator) for _ in range(g)])
    within = {}
    for tie, dim in group.dims().items():
        fixed = group.fixed_qk if tie == "qk" else 0
        within[tie] = torch.stack([
            torch.cat([torch.arange(fixed), fixed + torch.randperm(dim - fixed, generator=generator)]) for _ in range(g)
        ])
    return HeadPermutation(kv, query, within)


def decompose(group, perm: dict[str, torch.Tensor]) -> HeadPermutation:
    """The head permutation that ``perm`` composes; raises ArchitectureMismatchError naming what
    breaks the group's symmetry."""
    g, r = group.key_value_heads, group.queries_per_kv
    kv = query = None
    within: dict[str, torch.Tensor] = {}
    for slot in group.slots:
        per_query, tie = SLOT_KINDS[slot.kind]
        copies, unit = (r if per_query else 1), group.unit(slot)
        p = torch.as_tensor(perm[slot.name]).cpu().view(g, copies, unit)
        blocks = p // unit
        if not (blocks == blocks[..., :1]).all():
            raise ArchitectureMismatchError(
                f"perm[{slot.name!r}] moves units between attention heads: heads must stay whole.")
        blocks = blocks[..., 0]
        slot_kv, slot_query = blocks // copies, blocks % copies
        if not (slot_kv == slot_kv[:, :1]).all():
            raise ArchitectureMismatchError(
                f"perm[{slot.name!r}] moves a query head to another key/value group: grouped-query attention "
                "lets query heads move only inside their group, or with it.")
        inner = p % unit
        if not (inner == inner[:, :1]).all():
            raise ArchitectureMismatchError(
                f"perm[{slot.name!r}] permutes the dimensions of the query heads of one key/value group "
                "differently: they share their key and value heads, so they must move alike.")
        for name, mine, theirs in (("key/value heads", slot_kv[:, 0], kv),
                                   ("query heads", slot_query if per_query else None, query),
                                   ("head dimensions", inner[:, 0] if tie else None, within.get(tie or ""))):
            if mine is not None and theirs is not None and not torch.equal(mine, theirs):
                raise ArchitectureMismatchError(
                    f"The slots of {group.name!r} relabel the {name} differently: queries, keys and values must "
                    "move with their head.")
        kv = slot_kv[:, 0]
        if per_query:
            query = slot_query
        if tie:
            within[tie] = inner[:, 0]
    fixed = group.fixed_qk
    if fixed and "qk" in within and not (within["qk"][:, :fixed] == torch.arange(fixed)).all():
        raise ArchitectureMismatchError(
            f"The permutation moves rotary query/key dimensions of {group.name!r}: each is rotated at its own "
            "frequency, so they must stay in place.")
    if query is None:
        query = torch.zeros(g, r, dtype=torch.long)
    return HeadPermutation(kv, query, within)
