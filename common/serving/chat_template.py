"""Chat messages -> prompt token ids, in the front end, where a failure can hurt one request only.

A chat template is a Jinja program, and it runs on the server: the model's own one may call
`raise_exception` (a role-alternation check), and a client's own one (`chat_template` in the
request, only with `--trust-request-chat-template`) may try anything. transformers renders
templates in Jinja's ImmutableSandboxedEnvironment (no attribute access to internals, no mutation
of the arguments); here every exception of the rendering becomes a 400 that carries the
template's message, so a template can fail its request and nothing else.

Message content may be a string, a list of parts of which only `text` parts are taken (joined by
newlines, as vLLM does for templates that expect strings), or null on an assistant turn.
"""

from common.serving.openai_protocol import APIError
from common.serving.template_worker import TemplateBusy

ROLES = ("system", "developer", "user", "assistant")
# Arguments of apply_chat_template a client may not set through chat_template_kwargs: they would
# change what the renderer returns (tokenize, return_dict...) or bypass the request's own fields.
RESERVED_KWARGS = {"conversation", "messages", "chat_template", "tools", "documents", "tokenize", "padding",
                   "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                   "tokenizer_kwargs", "add_generation_prompt", "continue_final_message"}


def _content(i: int, message: dict) -> str:
    content = message.get("content")
    where = f"messages[{i}].content"
    if content is None:
        if message["role"] == "assistant":
            return ""
        raise APIError(400, f"{where} is null: only an assistant message may have no content", param=where)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}[{j}]: only text parts are supported (got type {kind!r})",
                           param=f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages -> [{"role", "content": str, ("name")}] for a template."""
    if not messages:
        raise APIError(400, "messages is empty", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"messages[{i}].role {role!r} is not supported (one of {', '.join(ROLES)}; "
                           "tool messages need tool calling, which is not built)", param=f"messages[{i}].role")
        if message.get("tool_calls"):
            raise APIError(400, "tool calls are not supported", param=f"messages[{i}].tool_calls")
        entry = {"role": role, "content": _content(i, message)}
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out


def render_chat(tokenizer, messages: list[dict], template: str | None = None, kwargs: dict | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                worker=None) -> str:
    """The chat as text, by `template` or the tokenizer's own; every failure is a 400. `worker`: a
    template_worker.TemplateWorker, which renders a client's `template` under its limits."""
    kwargs = kwargs or {}
    if reserved := sorted(RESERVED_KWARGS & set(kwargs)):
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                       param=f"chat_template_kwargs.{reserved[0]}")
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true",
                       param="continue_final_message")
    if template is None and not getattr(tokenizer, "chat_template", None):
        # No template at all: the contents joined as plain text (printed once at start-up).
        return "\n\n".join(m["content"] for m in messages) + "\n"
    if template is not None and worker is not None:   # a client's template: in the limited worker
        return _render_in_worker(worker, tokenizer, messages, template, kwargs, add_generation_prompt,
                                 continue_final_message)
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **kwargs)
    except Exception as error:  # noqa: BLE001  (a template may raise anything; it fails its request only)
        raise APIError(400, f"the chat template failed: {type(error).__name__}: {error}",
                       param="chat_template" if template else "messages") from None
    if not isinstance(text, str):
        raise APIError(400, f"the chat template rendered a {type(text).__name__}, not text", param="messages")
    return text


def _render_in_worker(worker, tokenizer, messages, template, kwargs, add_generation_prompt,
                      continue_final_message) -> str:
    """The variables transformers gives a template, rendered by the worker (its limits apply)."""
    special = {k: v for k, v in getattr(tokenizer, "special_tokens_map", {}).items() if isinstance(v, str)}
    variables = {**special, **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
    try:
        text = worker.render(template, variables)
    except TemplateBusy as error:
        raise APIError(429, str(error), "rate_limit_error", headers={"Retry-After": "2"}) from None
    except ValueError as error:
        raise APIError(400, f"the chat template failed: {error}", param="chat_template") from None
    if continue_final_message:      # end the text where the last message's content ends
        final = messages[-1]["content"].strip()
        if final not in text:
            raise APIError(400, "continue_final_message: the template does not render the last message",
                           param="continue_final_message")
        text = text[:text.rindex(final) + len(final)]
    return text


def chat_prompt_ids(tokenizer, messages: list[dict], add_special_tokens: bool = False, **render) -> list[int]:
    """The rendered chat, tokenized. The template writes its own special tokens (BOS...), so by
    default none are added again (vLLM's default too)."""
    text = render_chat(tokenizer, normalize_messages(messages), **render)
    if render.get("template") is None and not getattr(tokenizer, "chat_template", None):
        add_special_tokens = True     # plain joined text is a completion prompt: BOS as a completion gets
    try:
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    except Exception as error:  # noqa: BLE001
        raise APIError(400, f"the rendered chat could not be tokenized: {error}", param="messages") from None
