"""Character-level tokenizer for the synthetic arithmetic task."""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# "\n" plus every printable ASCII character from space to "~", one token each.
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]


def build_synthetic_tokenizer(add_bos_token: bool = False):
    """A `transformers.PreTrainedTokenizerFast` with one token per character.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then "\\n" and the printable ASCII characters (100
    tokens in all). Encoding maps each character to its own token (anything else to <unk>) and
    decoding concatenates token texts, so decode(encode(s)) == s for ASCII text with no spaces
    added or removed. With `add_bos_token`, encoding prepends <bos> (off by default, so prompt
    and response token counts equal their character counts). Saves and loads with
    save_pretrained / AutoTokenizer.from_pretrained like any tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Isolate every single character, newline included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if add_bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
