"""A token-reduction method vtprune does not ship, written outside the package against ``vtprune.methods.Method``.

NormMerge: after ``layer`` decoder layers, keep the image tokens whose hidden state has the largest norm and merge
the others into a few tokens by key similarity (the next layer's keys), with the public op
:func:`vtprune.ops.select_and_merge`. The method only decides which tokens stay; the model integration keeps the
sequence, positions, KV cache, masks and padding consistent, on every supported family.

Run ``python examples/custom_method.py``: every supported family (tiny random-weight models), a padded batch of
two prompts, ``generate``.
"""

import torch

import vtprune
from vtprune.methods import Hooks, Method, PruneContext, Selection


class NormMerge(Method):
    """Keep ``keep`` and merge into ``merged`` (fractions of each row's image tokens; ``keep=None``: every token)."""

    name = "normmerge"

    def __init__(self, layer: int = 2, keep: float | None = 0.25, merged: float = 0.125, *, backend="auto"):
        super().__init__(backend)
        self.layer, self.keep, self.merged = layer, keep, merged

    def hooks(self, num_layers: int) -> Hooks:
        return Hooks(prune_after=(self.layer,))  # select_visual after `layer` decoder layers of a prefill

    def budget(self, n: int) -> tuple[int, int]:
        """(kept, merged) tokens of a row that holds ``n`` image tokens."""
        if self.keep is None:
            return n, 0
        return max(1, round(self.keep * n)), round(self.merged * n)

    def select_visual(self, ctx: PruneContext) -> Selection:
        kept, merged = self.budget(ctx.count)
        scores = ctx.visual(ctx.hidden).float().norm(dim=-1)  # [R, n] the image tokens' hidden-state norms
        _, k, _ = ctx.qk("next")  # [R, Hkv, L, d] post-RoPE keys of the next layer
        metric = ctx.visual(k.mean(1))  # [R, n, d] merge metric: keys averaged over heads
        tokens, keep_idx, target_idx = vtprune.ops.select_and_merge(scores, ctx.visual(ctx.tokens), metric, kept,
                                                                    merged, backend=self.backend)
        return Selection(tokens, keep_idx, target_idx)


def main():
    from vtprune.models._tiny import TINY_FAMILIES  # tiny random-weight models of every supported family

    for name, family in TINY_FAMILIES.items():
        model = family.build()
        batch = family.batch(model, (3, 7), (6, 4), seed=1)  # two prompts of different lengths, left-padded
        with vtprune.apply(model, NormMerge()) as handle, torch.no_grad():
            out = model.generate(**batch, max_new_tokens=6, do_sample=False)
            print(f"{name}: visual tokens per layer and row {handle.stats.visual_tokens_per_row}, "
                  f"generated {out[:, -6:].tolist()}")


if __name__ == "__main__":
    main()
