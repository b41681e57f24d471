"""``phivlm serve``: a Gradio web demo — upload an image, chat about it, answers streamed token by token."""
from __future__ import annotations

import logging
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from .data.images import BadImage, open_rgb  # noqa: E402
from .data.synth import render, sample_scene  # noqa: E402
from .generate import GenerationConfig  # noqa: E402
from .infer import MAX_QUESTION_CHARS, Assistant  # noqa: E402
from .errors import PhivlmError  # noqa: E402
from .loading.checkpoint import resolve_checkpoint  # noqa: E402

log = logging.getLogger(__name__)

MAX_UPLOAD = "50mb"  # byte limit per upload; pixel limits are open_rgb's
DELETE_UPLOADS = (600, 3600)  # every 10 min, delete uploads older than an hour
N_EXAMPLES = 3
CSS = "#random-warning {background: #fff3cd; color: #664d03; border: 1px solid #ffda6a;" \
      " border-radius: 6px; padding: 6px 10px;} #status {min-height: 1.5em;}"


@dataclass
class Chat:
    """One browser session's conversation: the image it is about (its encoded features only: an upload's
    pixels are not kept), the model's turns and what is shown."""

    features: torch.Tensor | None = None
    image_path: str = ""
    image_name: str = ""
    turns: list[tuple[str, str]] = field(default_factory=list)
    shown: list[dict[str, str]] = field(default_factory=list)


def _upload_path(value: Any) -> tuple[str, str]:
    """(path, display name) of an image component value: a FileData dict (unprocessed) or a path."""
    if isinstance(value, dict):
        path = value.get("path") or ""
        return path, value.get("orig_name") or Path(path).name
    return str(value), Path(str(value)).name


def header(assistant: Assistant, checkpoint: str | Path) -> str:
    m = assistant.cfg.model
    return (f"**Model:** vision `{m.vision}` + LM `{m.lm}` (projector `{m.projector}`, template "
            f"`{assistant.template.name}`, device `{assistant.device}`) · **checkpoint:** `{checkpoint}`")


def random_warning(assistant: Assistant) -> str:
    name = assistant.cfg.model.vision
    return (f"⚠️ The vision tower `{name}` has RANDOM weights (no pretrained CLIP weights were available): "
            "the answers only reflect what a random encoder keeps of the image. Fine for trying the "
            "pipeline, not for real use.")


def limits(assistant: Assistant) -> str:
    return (f"Questions hold at most {MAX_QUESTION_CHARS} characters. When a conversation outgrows the model's "
            f"context ({assistant.context} tokens), its oldest exchanges are left out. Uploads are deleted "
            f"after an hour; only the encoded image is kept for the conversation.")


def example_images(folder: Path, seed: int = 0) -> list[Path]:
    """A few synthetic shapes scenes (the kind of image the built-in demo trains on)."""
    rng = random.Random(seed)
    paths = []
    for i in range(N_EXAMPLES):
        p = folder / f"example-{i + 1}.png"
        render(sample_scene(rng)).save(p)
        paths.append(p)
    return paths


class Handlers:
    """The page's event handlers, kept free of layout so tests can call them directly."""

    def __init__(self, assistant: Assistant, seed: int = 0, repetition_penalty: float = 1.0):
        self.assistant, self.seed, self.repetition_penalty = assistant, seed, repetition_penalty

    def new_image(self, value: Any, chat: Chat) -> tuple[Chat, list, str, Any]:
        """An upload: validate it and start a new conversation, or keep the current one and say what is wrong."""
        if value is None:
            return self.no_image()
        path, name = _upload_path(value)
        try:
            image = open_rgb(path)
            features = self.assistant.features([image]).cpu()
        except BadImage as e:
            reason = str(e).replace(path, name).removeprefix(f"{name}: ")
            msg = f"⚠️ Could not use “{name}”: {reason}. Please choose another image."
            gr.Warning(msg)
            return chat, chat.shown, msg, chat.image_path or None  # the preview goes back to the current image
        return (Chat(features, path, name), [], f"Loaded “{name}” ({image.width}×{image.height}). Ask a question.",
                gr.skip())

    def example(self, value: Any) -> tuple[Chat, list, str, Any]:
        return self.new_image(value, Chat())

    def no_image(self) -> tuple[Chat, list, str, Any]:
        return Chat(), [], "Upload an image (or pick an example) to start.", gr.skip()

    def clear(self, chat: Chat) -> tuple[Chat, list, str]:
        """Forget the conversation, keep the image."""
        return (Chat(chat.features, chat.image_path, chat.image_name), [],
                "Conversation cleared." if chat.features is not None else "")

    def respond(self, question: str, chat: Chat, temperature: float, top_p: float,
                max_new_tokens: float) -> Iterator[tuple[Chat, list, str, str]]:
        """Append the question and stream the answer into the chat (yields chat, messages, status, textbox)."""
        question = (question or "").strip()
        if chat.features is None or not question:
            msg = "⚠️ Upload an image (or pick an example) first." if chat.features is None else \
                "⚠️ Type a question first."
            gr.Warning(msg)
            yield chat, chat.shown, msg, question
            return
        first = not chat.turns
        turns = chat.turns + [("user", self.assistant.first_turn(question) if first else question)]
        shown = chat.shown + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        gen = GenerationConfig(int(max_new_tokens), float(temperature), float(top_p), self.repetition_penalty)
        text = ""
        try:
            turns, dropped = self.assistant.fit(turns, gen.max_new_tokens)
        except PhivlmError as e:
            gr.Warning(str(e))
            yield chat, chat.shown, f"⚠️ {e}", question
            return
        yield chat, shown, "Answering…", ""
        try:
            for text in self.assistant.stream(None, turns, gen, self.seed, features=chat.features):
                shown[-1] = {"role": "assistant", "content": text}
                yield chat, shown, "Answering…", ""
        except PhivlmError as e:
            gr.Warning(str(e))
            yield chat, chat.shown, f"⚠️ {e}", question
            return
        except Exception as e:  # the page must keep working whatever one request does
            log.exception("generation failed")
            yield chat, chat.shown, f"⚠️ Generation failed: {type(e).__name__}: {e}", question
            return
        if not text:
            shown[-1] = {"role": "assistant", "content": "(the model stopped without an answer)"}
        done = Chat(chat.features, chat.image_path, chat.image_name, turns + [("assistant", text)], shown)
        note = (f"; the {dropped} oldest exchange{'s' if dropped > 1 else ''} no longer fit the model's context "
                "and are left out" if dropped else "")
        yield done, shown, f"Answered ({len(done.turns) // 2} turn{'s' if len(done.turns) > 2 else ''}{note}).", ""


def build_app(assistant: Assistant, checkpoint: str | Path, gen: GenerationConfig, examples: list[Path],
              seed: int = 0) -> gr.Blocks:
    h = Handlers(assistant, seed, gen.repetition_penalty)
    with gr.Blocks(title="phivlm", analytics_enabled=False, delete_cache=DELETE_UPLOADS) as demo:
        chat = gr.State(Chat())
        chatbot = gr.Chatbot(label="Conversation", height=420, buttons=["copy", "copy_all"], elem_id="chatbot",
                             render=False)
        status = gr.Markdown("Upload an image (or pick an example) to start.", elem_id="status", render=False)
        gr.Markdown("## phivlm — chat about an image")
        gr.Markdown(header(assistant, checkpoint), elem_id="model-info")
        if assistant.loaded.tower.random_weights:
            gr.Markdown(random_warning(assistant), elem_id="random-warning")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 height=300, elem_id="image")
                image_out = [chat, chatbot, status, image]
                gr.Examples([[str(p)] for p in examples], inputs=[image], outputs=image_out, fn=h.example,
                            run_on_click=True, cache_examples=False, preprocess=False, label="Example images")
                with gr.Accordion("Generation settings", open=True):
                    temperature = gr.Slider(0.0, 2.0, gen.temperature, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, gen.top_p, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, 1024, gen.max_new_tokens, step=1, label="Max new tokens")
            with gr.Column(scale=3):
                chatbot.render()
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False,
                                          scale=5, elem_id="question", max_length=MAX_QUESTION_CHARS)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                clear = gr.Button("Clear conversation", elem_id="clear")
                status.render()
                gr.Markdown(limits(assistant), elem_id="limits")

        # unprocessed upload, validated by open_rgb, so a bad file gets a clear message instead of a crash
        image.upload(h.new_image, [image, chat], image_out, preprocess=False)
        image.clear(h.no_image, None, image_out)
        ask = dict(fn=h.respond, inputs=[question, chat, temperature, top_p, max_new],
                   outputs=[chat, chatbot, status, question], concurrency_id="generate")  # one limit for both
        events = [question.submit(**ask), send.click(**ask)]
        for clearing in (clear.click, chatbot.clear):  # the button and the chat's own bin icon
            clearing(h.clear, [chat], [chat, chatbot, status], cancels=events, queue=False)
    return demo


def serve(checkpoint: str | Path, gen: GenerationConfig, host: str = "127.0.0.1", port: int = 7860,
          share: bool = False, concurrency: int = 1, device: str = "auto", seed: int = 0,
          trust_remote_code: bool = False) -> None:
    """Load the checkpoint and serve the demo until interrupted."""
    if concurrency < 1:
        raise PhivlmError(f"--concurrency must be at least 1 (got {concurrency})")
    assistant = Assistant(checkpoint, device, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="phivlm-serve-") as tmp:
        examples = example_images(Path(tmp), seed)
        demo = build_app(assistant, resolve_checkpoint(checkpoint).resolve(), gen, examples, seed)
        demo.queue(default_concurrency_limit=concurrency, max_size=64)
        demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                    allowed_paths=[tmp], ssr_mode=False, show_error=True, css=CSS)
