"""A chat's transcript as the conversation of a tool-calling model (OpenAI roles user, assistant, tool).

In tool-calling mode an expert's message answers one tool call of the assistant message before it
(``Message.tool_call``): the assistant message gets those calls back as its ``tool_calls``, each
expert message becomes a ``tool`` message with the same feedback text the trigger path sends (its
``<image>`` named in words), and the overlay images of the results follow in one user message, each
after a line naming its call. Expert messages without a call (a chat begun with triggers) reach the
model as user text, as in :func:`vila_m3.chat.transcript.vlm_conversation`.
"""

from __future__ import annotations

from typing import Any

from vila_m3.chat.transcript import Message
from vila_m3.experts.feedback import IMAGE_TOKEN
from vila_m3.experts.tools import overlay_message_text, tool_result_text
from vila_m3.vlm.remote import ToolCall


def tool_conversation(messages: list[Message], overlay_images: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """The messages (for :meth:`~vila_m3.vlm.remote.RemoteVLM.generate_with_tools`) and the image names,
    in placeholder order, a tool-calling model gets for ``messages``.

    Args:
        messages: the transcript; notes (``to_model`` False) and interrupted messages are left out.
        overlay_images: send the overlays of tool results (a user message after the tool messages);
            False: the tool results go as text only.
    """
    kept = [message for message in messages if message.to_model and not message.interrupted]
    out: list[dict[str, Any]] = []
    images: list[str] = []
    pending: list[tuple[str, str, list[str]]] = []  # (expert, call id, overlay names) after the tool messages

    def user(text: str, names: list[str]) -> None:
        if out and out[-1]["role"] == "user":
            out[-1]["content"] += text
        else:
            out.append({"role": "user", "content": text})
        images.extend(names)

    def flush() -> None:
        if pending:
            user("".join(f"{overlay_message_text(name, call_id)}\n" + IMAGE_TOKEN * len(names) + "\n"
                         for name, call_id, names in pending), [n for _, _, names in pending for n in names])
            pending.clear()

    for position, message in enumerate(kept):
        if message.role == "expert" and message.tool_call:
            call = message.tool_call
            out.append({"role": "tool", "tool_call_id": call["id"], "content": tool_result_text(message.text)})
            if overlay_images and message.images:
                pending.append((message.expert or call["name"], call["id"], list(message.images)))
            continue
        flush()
        if message.role == "assistant":
            calls = []
            for later in kept[position + 1:]:
                if later.role != "expert" or not later.tool_call:
                    break
                calls.append(ToolCall(later.tool_call["id"], later.tool_call["name"], later.tool_call["arguments"]))
            out.append({"role": "assistant", "content": message.text, "tool_calls": calls})
        else:  # the annotator's question, or an expert result of the trigger path
            user(message.text, list(message.images))
    flush()
    return out, images
