"""``PhivlmProcessor``: the exported processor of a model whose image is cut into tiles.

``LlavaProcessor`` expands ``<image>`` to one run of image tokens; phivlm's tiled prompt is each tile's marker
text (``phivlm.data.templates.tile_markers``: where the tile lies) and that tile's image tokens, in either order. This
processor expands ``<image>`` to exactly that, so the text a user's chat template renders tokenizes to
phivlm's own prompt ids (``phivlm export`` checks it)."""
from __future__ import annotations

from transformers import LlavaProcessor


class PhivlmProcessor(LlavaProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 tokens_per_tile: int = 1, tile_markers: list[str] | None = None, markers_after: bool = False,
                 **kwargs):
        """``tokens_per_tile``: image tokens of one tile; ``tile_markers``: each tile's marker text, one per tile,
        row-major, before the tile's tokens (after them with ``markers_after``)."""
        self.tokens_per_tile, self.tile_markers = tokens_per_tile, list(tile_markers or [])
        self.markers_after = markers_after
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                         image_token=image_token, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        tile = self.image_token * self.tokens_per_tile
        return "".join(tile + marker if self.markers_after else marker + tile for marker in self.tile_markers)
