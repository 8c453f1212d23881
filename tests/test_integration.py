"""Where other code loads the model: patch_transformers, the AutoModelForCausalLM drop-in, pipelines and chat
templates, accelerate's device_map. Tiny checkpoints are saved to a temporary folder as safetensors."""

import pytest
import torch
import transformers
from transformers import LlamaConfig, pipeline

import qwen3_accel
from conftest import left_padded_batch
from qwen3_accel.configs import build_model
from qwen3_accel.eval.tokenizer import train_tokenizer
from qwen3_accel.optimize import Qwen3Accelerator

GREEDY = dict(do_sample=False, pad_token_id=0, max_new_tokens=6)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(Qwen3 folder, Llama folder, tokenizer), saved once."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = train_tokenizer(384)
    tokenizer.chat_template = CHAT_TEMPLATE
    build_model("tiny").save_pretrained(root / "qwen3")
    tokenizer.save_pretrained(root / "qwen3")
    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(llama).save_pretrained(root / "llama")
    return root / "qwen3", root / "llama", tokenizer


@pytest.fixture
def patched():
    qwen3_accel.patch_transformers(compile=False)
    yield
    qwen3_accel.unpatch_transformers()


def _plain(path):
    assert not qwen3_accel.auto.is_patched()
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def test_patch_transformers_optimizes_qwen3_and_leaves_other_models(checkpoints, patched):
    qwen3_dir, llama_dir, _ = checkpoints
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir)
    assert isinstance(model.qwen3_accel, Qwen3Accelerator)
    assert model.qwen3_accel.options.compile is False
    assert hasattr(transformers.Qwen3ForCausalLM.from_pretrained(qwen3_dir), "qwen3_accel")
    llama = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert type(llama).__name__ == "LlamaForCausalLM" and not hasattr(llama, "qwen3_accel")
    qwen3_accel.unpatch_transformers()
    assert not hasattr(transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir), "qwen3_accel")
    ids, mask = left_padded_batch([5, 8], 512, seed=1)
    expected = _plain(qwen3_dir).generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY), expected)


def test_import_swap_drop_in(checkpoints):
    qwen3_dir, llama_dir, _ = checkpoints
    model = qwen3_accel.AutoModelForCausalLM.from_pretrained(qwen3_dir, qwen3_accel_options=dict(compile=False))
    assert model.qwen3_accel.options.compile is False
    assert not hasattr(qwen3_accel.AutoModelForCausalLM.from_pretrained(llama_dir), "qwen3_accel")
    assert not qwen3_accel.auto.is_patched()
    ids, mask = left_padded_batch([7], 512, seed=2)
    expected = _plain(qwen3_dir).generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY), expected)


def test_text_generation_pipeline_and_chat_template(checkpoints, monkeypatch):
    qwen3_dir, _, tokenizer = checkpoints
    plain = _plain(qwen3_dir)
    optimized = qwen3_accel.optimize(_plain(qwen3_dir), compile=False)
    prefills = []
    acc = optimized.qwen3_accel
    monkeypatch.setattr(acc.runner, "prefill", lambda *args, _run=acc.runner.prefill: prefills.append(1) or _run(*args))
    prompt = "Tell me about the weather"
    settings = dict(max_new_tokens=8, do_sample=False)
    texts = [pipeline("text-generation", model=m, tokenizer=tokenizer)(prompt, **settings)[0]["generated_text"]
             for m in (plain, optimized)]
    assert texts[0] == texts[1] and len(texts[0]) > len(prompt)
    messages = [{"role": "user", "content": "What is a GPU?"}]
    chats = [pipeline("text-generation", model=m, tokenizer=tokenizer)(messages, **settings)[0]["generated_text"]
             for m in (plain, optimized)]
    assert chats[0] == chats[1] and chats[0][-1]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    expected = plain.generate(**ids, **settings, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(optimized.generate(**ids, **settings, pad_token_id=tokenizer.pad_token_id), expected)
    assert len(prefills) == 3  # every request ran on our kernels


def test_accelerate_device_map(checkpoints, tmp_path):
    qwen3_dir, _, _ = checkpoints
    one_device = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, device_map="auto")
    assert hasattr(qwen3_accel.optimize(one_device, compile=False), "qwen3_accel")
    offloaded_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                     "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        qwen3_dir, device_map=offloaded_map, offload_folder=str(tmp_path)
    )
    with pytest.raises(ValueError, match="needs the whole model on one device; accelerate placed it on"):
        qwen3_accel.optimize(offloaded, compile=False)
