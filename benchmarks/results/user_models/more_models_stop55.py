"""The user flow of ``benchmarks/user_models.py`` on models tried once at stop 55 and not added to it (and the ten
that were, under their names there): ``python benchmarks/results/user_models/more_models_stop55.py NAME`` prints one
JSON line (after ``JSON``). Rows: ``more_models_stop55.jsonl``."""
import json, sys, time, traceback, os
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir))
import user_models as um
_LM = um._LM
V = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
NEW = {
 "gpt_neo": ("lm", "GPTNeoConfig", "GPTNeoForCausalLM", dict(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64)),
 "codegen": ("lm", "CodeGenConfig", "CodeGenForCausalLM", dict(vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
 "mpt": ("lm", "MptConfig", "MptForCausalLM", dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
 "xglm": ("lm", "XGLMConfig", "XGLMForCausalLM", dict(vocab_size=32, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=64)),
 "gemma3": ("lm", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(_LM, num_key_value_heads=2, head_dim=8, sliding_window=8)),
 "qwen3_moe": ("lm", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_LM, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
 "deepseek_v3": ("lm", "DeepseekV3Config", "DeepseekV3ForCausalLM", dict(_LM, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
 "granite": ("lm", "GraniteConfig", "GraniteForCausalLM", dict(_LM, num_key_value_heads=2)),
 "cohere": ("lm", "CohereConfig", "CohereForCausalLM", dict(_LM, num_key_value_heads=2)),
 "olmo2": ("lm", "Olmo2Config", "Olmo2ForCausalLM", dict(_LM, num_key_value_heads=2)),
 "stablelm": ("lm", "StableLmConfig", "StableLmForCausalLM", dict(_LM, num_key_value_heads=2)),
 "mamba": ("lm", "MambaConfig", "MambaForCausalLM", dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, state_size=8)),
 "rwkv": ("lm", "RwkvConfig", "RwkvForCausalLM", dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, context_length=64)),
 "glm": ("lm", "GlmConfig", "GlmForCausalLM", dict(_LM, num_key_value_heads=2, head_dim=8, pad_token_id=0, eos_token_id=1)),
 "smollm3": ("lm", "SmolLM3Config", "SmolLM3ForCausalLM", dict(_LM, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)),
 "lfm2": ("lm", "Lfm2Config", "Lfm2ForCausalLM", dict(_LM, num_key_value_heads=2)),
 "xlm_roberta": ("cls", "XLMRobertaConfig", "XLMRobertaForSequenceClassification", _LM),
 "mpnet": ("cls", "MPNetConfig", "MPNetForSequenceClassification", _LM),
 "funnel": ("cls", "FunnelConfig", "FunnelForSequenceClassification", dict(vocab_size=32, d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1], num_decoder_layers=1)),
 "convbert": ("cls", "ConvBertConfig", "ConvBertForSequenceClassification", dict(_LM, embedding_size=32)),
 "squeezebert": ("cls", "SqueezeBertConfig", "SqueezeBertForSequenceClassification", dict(_LM, embedding_size=32, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2, output_groups=2)),
 "modernbert": ("cls", "ModernBertConfig", "ModernBertForSequenceClassification", dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
 "roformer": ("cls", "RoFormerConfig", "RoFormerForSequenceClassification", dict(_LM, embedding_size=32)),
 "pegasus": ("s2s", "PegasusConfig", "PegasusForConditionalGeneration", dict(vocab_size=32, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=0)),
 "mbart": ("s2s", "MBartConfig", "MBartForConditionalGeneration", dict(vocab_size=32, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
 "cvt": ("img", "CvtConfig", "CvtForImageClassification", dict(num_channels=3, embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], mlp_ratio=[2.0, 2.0, 2.0])),
 "pvt_v2": ("img", "PvtV2Config", "PvtV2ForImageClassification", dict(image_size=32, num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
 "swinv2": ("img", "Swinv2Config", "Swinv2ForImageClassification", dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)),
 "bit": ("img", "BitConfig", "BitForImageClassification", dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4)),
 "mobilenet_v1_hf": ("img", "MobileNetV1Config", "MobileNetV1ForImageClassification", dict(image_size=32, depth_multiplier=0.25)),
 "mobilenet_v2_hf": ("img", "MobileNetV2Config", "MobileNetV2ForImageClassification", dict(image_size=32, depth_multiplier=0.25)),
 "clip": ("img", "CLIPConfig", "CLIPForImageClassification", dict(vision_config=V, text_config=dict(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))),
 "siglip": ("img", "SiglipConfig", "SiglipForImageClassification", dict(vision_config=V, text_config=dict(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))),
 "data2vec_vision": ("img", "Data2VecVisionConfig", "Data2VecVisionForImageClassification", V),
 "hiera": ("img", "HieraConfig", "HieraForImageClassification", dict(image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=16, depths=[1, 1], num_heads=[1, 2], query_stride=[2, 2], masked_unit_size=[4, 4], num_query_pool=1)),
 "wavlm": ("wav", "WavLMConfig", "WavLMForSequenceClassification", dict(um._AUDIO)),
 "sew": ("wav", "SEWConfig", "SEWForSequenceClassification", dict(um._AUDIO, squeeze_factor=2)),
 "data2vec_audio": ("wav", "Data2VecAudioConfig", "Data2VecAudioForSequenceClassification", dict(um._AUDIO)),
 "unispeech_sat": ("wav", "UniSpeechSatConfig", "UniSpeechSatForSequenceClassification", dict(um._AUDIO)),
}
TV = ["resnet50", "vgg11_bn", "alexnet", "efficientnet_v2_s", "mobilenet_v3_large", "maxvit_t", "swin_v2_t", "wide_resnet50_2", "regnet_y_800mf"]
um.TRANSFORMERS.update(NEW)
um.TORCHVISION.extend(TV)
if __name__ == "__main__":
    name = sys.argv[1]
    t0 = time.perf_counter()
    try:
        out = um.run(name); out["ok"] = True
    except Exception as e:
        out = dict(model=name, ok=False, error=f"{type(e).__name__}: {e}"[:1500], tb=traceback.format_exc()[-3000:])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print("JSON", json.dumps(out), flush=True)
