"""``PhivlmProcessor``: the exported processor of a model whose image is cut into tiles.

``LlavaProcessor`` expands ``<image>`` to one run of image tokens; phivlm's tiled prompt is each tile's marker
text (``phivlm.data.templates.tile_markers``: where the tile lies) followed by that tile's image tokens. This
processor expands ``<image>`` to exactly that, so the text a user's chat template renders tokenizes to
phivlm's own prompt ids (``phivlm export`` checks it)."""
from __future__ import annotations

from transformers import LlavaProcessor


class PhivlmProcessor(LlavaProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 tokens_per_tile: int = 1, tile_markers: list[str] | None = None, **kwargs):
        """``tokens_per_tile``: image tokens of one tile; ``tile_markers``: the text before each tile's tokens, one
        per tile, row-major."""
        self.tokens_per_tile, self.tile_markers = tokens_per_tile, list(tile_markers or [])
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                         image_token=image_token, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return "".join(marker + self.image_token * self.tokens_per_tile for marker in self.tile_markers)
