"""``PhivlmProcessor``: the exported processor of a model whose image is cut into tiles.

``LlavaProcessor`` expands ``<image>`` to one run of image tokens; phivlm's tiled prompt is each tile's marker
text (``phivlm.data.templates.TILE_MARKER``: its row and column) followed by that tile's image tokens. This
processor expands ``<image>`` to exactly that, so the text a user's chat template renders tokenizes to
phivlm's own prompt ids (``phivlm export`` checks it)."""
from __future__ import annotations

from transformers import LlavaProcessor


class PhivlmProcessor(LlavaProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>",
                 image_tiles: int = 1, tokens_per_tile: int = 1, tile_marker: str = " r{row}c{col}:", **kwargs):
        """``image_tiles``: tiles per side; ``tokens_per_tile``: image tokens of one tile; ``tile_marker``: the
        text before each tile's tokens, formatted with its ``row`` and ``col`` (from 1)."""
        self.image_tiles, self.tokens_per_tile, self.tile_marker = image_tiles, tokens_per_tile, tile_marker
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                         image_token=image_token, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        n = self.image_tiles
        return "".join(self.tile_marker.format(row=i // n + 1, col=i % n + 1) + self.image_token * self.tokens_per_tile
                       for i in range(n * n))
