"""One rendering of a model's own chat template for every stage, and assistant-only masks cut out of it.

Every stage that turns a conversation into tokens goes through here: SFT (the assistant turns it trains
on), the prompts of DPO / KTO / NCA, and the generation prompts of trees and eval. So a model is trained
and evaluated on the same text: its template's, with a system message placed where the template places
it (or, for a template that refuses one, such as Gemma's, put before the first user message).

Assistant-only masks for any template that renders turn by turn: the conversation is rendered once,
each assistant turn is found by rendering the conversation up to it (with the generation prompt: where
the turn starts) and through it (where it ends), and the tokens of that stretch are trained on. Each
turn is checked: the tokens cut out must be the message's content plus the template's end of turn
(special tokens and whitespace), nothing of another message. A template that renders earlier messages
differently once later ones follow (Mistral v3 moves the system message into the last user turn) can't
be cut that way: that is one line naming the message that changes and `chat_template_path`.

Templates with `{% generation %}` markers, and those TRL recognises and patches, are left to TRL's own
masks (`needs_own_masks` is False for them) where align's cut gives the same mask (the tests hold this for
Llama 3, Gemma and Phi-3) or cannot cut the template (Qwen3's). TRL's Qwen2.5 patch also trains the newline that ends each `<|im_start|>assistant`
header: that newline is the last character of the generation prompt, given to the model at inference, not
written by it, so align masks Qwen2.5 itself (content plus `<|im_end|>` and its newline).
"""

from __future__ import annotations

import logging

from align.core.errors import AlignError

logger = logging.getLogger("align")

SYSTEM_PROBE = "alignSystemProbe7f3a"  # no whitespace: templates trim contents
FOLD_SEPARATOR = "\n\n"


class Unsplittable(Exception):
    """The template cannot be cut into turns on this conversation: `message` (0-based) is where it goes wrong."""

    def __init__(self, message: int, role: str, detail: str):
        super().__init__(detail)
        self.message, self.role, self.detail = message, role, detail


def chat_template_text(tokenizer) -> str | None:
    template = tokenizer.chat_template
    return template.get("default") if isinstance(template, dict) else template


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The text the model's template makes of `messages` (as they are: see `conversation` for the system)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def takes_system(tokenizer) -> bool:
    """Whether the template renders a leading system message (Gemma's raises on one; some drop it). Probed
    once per template."""
    template = chat_template_text(tokenizer)
    cached = getattr(tokenizer, "_align_takes_system", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    try:
        text = render(tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "u"}],
                      add_generation_prompt=True)
        takes = SYSTEM_PROBE in text
    except Exception:  # jinja's TemplateError from raise_exception, or a template's own TypeError
        takes = False
    tokenizer._align_takes_system = (template, takes)
    return takes


def conversation(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` as this model's template takes them: a leading system message kept where the template
    renders one, else put before the first user message's content, after a blank line (as users of Gemma's
    and of Mixtral-Instruct v0.1's first template do)."""
    messages = [dict(m) for m in messages]
    if not messages or messages[0].get("role") != "system" or takes_system(tokenizer):
        return messages
    system, rest = messages[0], messages[1:]
    for m in rest:
        if m.get("role") == "user":
            m["content"] = f"{system['content']}{FOLD_SEPARATOR}{m['content']}"
            return rest
    return rest  # no user message to carry it: the template has no place for it


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The generation prompt for `messages` (trees, eval): the template's rendering plus its assistant header."""
    return render(tokenizer, conversation(tokenizer, messages), add_generation_prompt=True)


def needs_own_masks(tokenizer) -> bool:
    """True when align cuts the assistant turns out itself (`assistant_mask`): the template has no
    `{% generation %}` markers and is not one TRL patches, or TRL patches it but its patched mask differs from
    align's cut on a probe conversation (Qwen2.5's patch also trains the newline of each assistant header, which
    the generation prompt gives the model: prompt text, not the assistant's). A patched template align cannot
    cut (Qwen3's, which drops earlier turns' reasoning) keeps TRL's mask. Probed once per template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = chat_template_text(tokenizer)
    if template is None or has_generation_markers(template):
        return False
    cached = getattr(tokenizer, "_align_needs_own_masks", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # ValueError: not one TRL patches; another: one TRL's probes cannot render (tool messages)
        own = True
    else:
        own = patched is not None and _patch_differs(tokenizer, patched)
    tokenizer._align_needs_own_masks = (template, own)
    return own


PROBE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "Two plus two is four."}, {"role": "user", "content": "And two times three?"},
         {"role": "assistant", "content": "Two times three is six."}]


def _patch_differs(tokenizer, patched: str) -> bool:
    """Whether TRL's patched template masks (or renders) the probe conversation otherwise than align's cut of
    the model's own template, where align can cut it."""
    if not getattr(tokenizer, "is_fast", False):
        return False  # no offsets to cut by: TRL's mask
    try:
        messages = conversation(tokenizer, PROBE)
        ids, mask, _ = assistant_mask(tokenizer, messages)
    except Exception:  # Unsplittable, or the template does not render the probe: TRL's mask
        return False
    try:
        trl = tokenizer.apply_chat_template(messages, chat_template=patched, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except Exception:  # the patch does not render the probe, which align's cut of the model's own template did
        return True
    return list(trl["input_ids"]) != ids or list(trl["assistant_masks"]) != mask


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _snippet(text: str, at: int, width: int = 24) -> str:
    return repr(text[max(0, at - width):at + width])


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise Unsplittable(index, message.get("role", "?"), "its content is not text")
    return content


def special_strings(tokenizer) -> list[str]:
    """The texts of the tokenizer's special and added tokens, longest first (an end of turn is made of them)."""
    texts = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in texts if t and not t.isspace()), key=len, reverse=True)


def assistant_mask(tokenizer, messages: list[dict], trained_from: int = 0, specials: list[str] | None = None):
    """input_ids of the whole conversation as the template renders it, and a 0/1 mask over them: 1 on each
    assistant message at index >= trained_from (its content and the template's end of turn). Raises
    `Unsplittable` where the template cannot be cut into turns, or a turn's tokens are not what they must be.
    Returns (input_ids, mask, turns without a special end-of-turn token)."""
    specials = special_strings(tokenizer) if specials is None else specials
    full = render(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    mask = [0] * len(ids)
    last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    through = []  # through[j]: the rendering of messages[:j + 1] (None where it does not render alone)
    for j in range(min(len(messages), last_assistant + 1)):
        message = messages[j]
        try:
            alone = render(tokenizer, messages[:j + 1])
        except Exception as err:
            if message.get("role") == "assistant":
                raise Unsplittable(j, "assistant", f"the conversation up to it does not render alone ({type(err).__name__}:"
                                   f" {' '.join(str(err).split())[:120]})") from None
            through.append(None)
            continue
        content = _content(message, j).strip()
        end = alone.rfind(content) + len(content) if content and content in alone else 0
        same = _common_prefix(alone, full)
        if same < end:
            raise Unsplittable(j, message.get("role", "?"), f"alone it renders as {_snippet(alone, same)}, in the "
                               f"whole conversation as {_snippet(full, same)}")
        through.append(alone)
    no_stop = 0
    for i in range(max(trained_from, 0), last_assistant + 1):
        message = messages[i]
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise Unsplittable(0, "assistant", "the conversation starts with an assistant message")
        try:
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        except Exception as err:
            raise Unsplittable(i, "assistant", f"the conversation before it does not render alone ({type(err).__name__}:"
                               f" {' '.join(str(err).split())[:120]})") from None
        if not full.startswith(prompt):
            at = _common_prefix(prompt, full)
            raise Unsplittable(i, "assistant", f"its generation prompt ends {_snippet(prompt, at)}, the conversation "
                               f"has {_snippet(full, at)} there")
        start = len(prompt)
        stop = len(full) if i == len(messages) - 1 else min(len(through[i]), _common_prefix(through[i], full))
        chosen = [t for t, (a, b) in enumerate(offsets) if b > a and b > start and a < stop and b <= stop]
        no_stop += not _check_turn(full, offsets, chosen, start, _content(message, i), specials, i)
        for t in chosen:
            mask[t] = 1
    return ids, mask, no_stop


def _check_turn(full: str, offsets, chosen: list[int], start: int, content: str, specials: list[str], i: int) -> bool:
    """The tokens cut out for assistant message i are its content plus an end of turn (special tokens and
    whitespace); a token shared with the header's last whitespace is allowed. Returns whether the end of
    turn holds a special token (the model learns to stop)."""
    if not chosen:
        raise Unsplittable(i, "assistant", "no tokens of it are found in the rendering")
    begin, end = offsets[chosen[0]][0], offsets[chosen[-1]][1]
    if full[begin:start].strip():
        raise Unsplittable(i, "assistant", f"its first token {full[begin:end][:24]!r} also holds prompt text")
    body = full[start:end]
    text = content.strip()
    at = body.find(text) if text else len(body) - len(body.lstrip())
    if at < 0 or body[:at].strip():
        raise Unsplittable(i, "assistant", f"its tokens {body[:48]!r} do not start with its content")
    tail = body[at + len(text):]
    rest = tail
    for special in specials:
        rest = rest.replace(special, "\x00")
    if rest.replace("\x00", "").strip():
        raise Unsplittable(i, "assistant", f"after its content come {tail[:48]!r}, not only an end of turn")
    return "\x00" in rest


def unsplittable_error(source: str, row: int, err: Unsplittable) -> AlignError:
    return AlignError(
        f"{source}: the chat template cannot be cut into turns at message {err.message + 1} ({err.role}) of row "
        f"{row}: {err.detail}; align finds assistant turns only in a template that writes each message as given and "
        "the same whatever follows it: set chat_template_path to such a template (a .jinja file, or one with "
        "{% generation %} markers)")


def placed_rows(dataset, tokenizer):
    """Conversational rows with a leading system message placed as the template takes it (`conversation`), for
    the rows TRL renders itself (SFT with {% generation %} markers or a template TRL patches); unchanged when the
    template renders system messages or the rows hold none."""
    column = "messages" if "messages" in dataset.column_names else "prompt"
    if column not in dataset.column_names or not len(dataset) or takes_system(tokenizer):
        return dataset
    if not isinstance(dataset[0][column], list):
        return dataset
    return _quiet_map(dataset, lambda example: {column: conversation(tokenizer, example[column])})


def _quiet_map(dataset, function, **kwargs):
    """`dataset.map` without progress bars: a one-line error raised inside stays one line."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return dataset.map(function, **kwargs)
    finally:
        if bars:
            datasets.enable_progress_bars()


def sft_rows(dataset, tokenizer, source: str, completion_only_loss: bool | None = None, num_proc: int | None = None):
    """SFT rows (messages, or prompt/completion conversations) as input_ids and assistant_masks, which TRL's
    SFTTrainer trains on as they are. Completion-only (TRL's default for prompt/completion rows): only the
    assistant turns of the completion. Every row is checked; the first bad one is the one-line error."""
    if not getattr(tokenizer, "is_fast", False):
        raise AlignError(f"{source}: the tokenizer is a slow (Python) one; assistant turns are found by token "
                         "offsets, which only a fast tokenizer gives: give the model folder its tokenizer.json")
    specials = special_strings(tokenizer)
    warned = []

    def one(example, index):
        if "messages" in example and example["messages"] is not None:
            messages, first = list(example["messages"]), 0
        else:
            prompt = list(example["prompt"])
            messages = prompt + list(example["completion"])
            first = 0 if completion_only_loss is False else len(prompt)
        placed = conversation(tokenizer, messages)
        first -= len(messages) - len(placed)  # a folded system message shifts the rest by one
        try:
            ids, mask, no_stop = assistant_mask(tokenizer, placed, first, specials)
        except Unsplittable as err:
            raise unsplittable_error(source, index, err) from None
        if 1 not in mask:
            raise AlignError(f"{source}: row {index} has no assistant message to train on")
        if no_stop and not warned:
            warned.append(True)
            logger.warning("sft: the chat template ends assistant turns without a special token (row %d): the model "
                           "may not learn to stop", index)
        return {"input_ids": ids, "assistant_masks": mask}

    return _quiet_map(dataset, one, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc)


PROMPTS_CHECKED = 256


def preference_rows(dataset, tokenizer, source: str, completions: tuple[str, ...]):
    """Preference rows (prompt plus chosen/rejected, or completion) with their prompt's system message placed as
    the template places it (every row), and the template checked on the first PROMPTS_CHECKED rows: the prompt's
    rendering with the generation prompt must begin the rendering of prompt plus each completion, or TRL would
    train on a context the model never sees."""
    dataset = placed_rows(dataset, tokenizer)
    if "prompt" not in dataset.column_names or not len(dataset) or not isinstance(dataset[0]["prompt"], list):
        return dataset
    for index, example in enumerate(dataset.select(range(min(len(dataset), PROMPTS_CHECKED)))):
        head = render(tokenizer, example["prompt"], add_generation_prompt=True)
        for column in completions:
            whole = render(tokenizer, list(example["prompt"]) + list(example[column]))
            if not whole.startswith(head):
                at = _common_prefix(head, whole)
                raise AlignError(
                    f"{source}: row {index}: the chat template renders the prompt with its generation prompt as "
                    f"{_snippet(head, at)} but prompt plus {column} as {_snippet(whole, at)}, so the model would be "
                    "trained on a context it never sees; give the model a template that renders turn by turn (chat_template_path "
                    "in the SFT recipe: the adapter's chat_template.jinja carries it to this stage)")
    return dataset
