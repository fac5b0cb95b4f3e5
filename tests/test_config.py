"""GraceConfig validation, serialisation and registration."""

import json

import pytest
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)

import grace_quant
from grace_quant import GraceConfig
from grace_quant.integrations import GraceHfQuantizer, register


def test_defaults_follow_the_method():
    config = GraceConfig()
    assert (config.bits, config.group_size, config.sym, config.mode) == (4, 128, True, "qat")
    assert config.quant_method == "grace" and config.modules_to_not_convert is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits=3 is not supported"),
        ({"bits": True}, "bits=True is not supported"),
        ({"group_size": -32}, "positive integer"),
        ({"group_size": 0}, "positive integer"),
        ({"group_size": 12}, "multiple of 8"),
        ({"bits": 8, "group_size": 6}, "multiple of 4"),
        ({"backend": "cuda"}, "backend='cuda' is unknown"),
        ({"mode": "int4"}, "mode='int4' is unknown"),
        ({"format_version": 99}, "upgrade"),
        ({"modules_to_not_convert": [3]}, "list of module-name strings"),
        ({"decode_attention": "yes"}, "decode_attention must be True or False, got 'yes'"),
        ({"deferred_stop_check": 1}, "deferred_stop_check must be True or False, got 1"),
        ({"fast_generate": None}, "fast_generate must be True or False, got None"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GraceConfig(**kwargs)


@pytest.mark.parametrize(
    ("group_size", "bits", "in_features", "problem"),
    [
        (128, 4, 4096, None),
        (96, 4, 288, None),  # valid for the format (a whole number of words, divides in_features), no fast kernel
        (64, 8, 256, None),
        (0, 4, None, "positive integer"),
        (True, 4, None, "positive integer"),
        (12, 4, None, "multiple of 8 for 4-bit packing"),
        (6, 8, None, "multiple of 4 for 8-bit packing"),
        (128, None, 96, "does not divide in_features=96"),
        (32, 4, 48, "does not divide in_features=48"),
    ],
)
def test_group_size_rule(group_size, bits, in_features, problem):
    from grace_quant.kernels import group_size_problem

    found = group_size_problem(group_size, bits, in_features)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(("bits", "group_size", "warns"), [(4, 16, True), (4, 256, True), (4, 96, True), (4, 32, False),
                                                           (4, 128, False), (8, 256, False)])  # fmt: skip
def test_group_sizes_outside_the_fast_kernels_warn_naming_the_supported_ones(bits, group_size, warns):
    import warnings

    from grace_quant.kernels import SUPPORTED_GROUPS

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GraceConfig(bits=bits, group_size=group_size)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert bool(messages) == warns, messages
    if warns:
        assert f"group_size={group_size}" in messages[0] and str(SUPPORTED_GROUPS) in messages[0]


def test_asymmetric_is_reserved():
    with pytest.raises(NotImplementedError, match="sym=True"):
        GraceConfig(sym=False)


def test_from_dict_accepts_quant_method_and_keeps_unknown_keys():
    data = {"quant_method": "grace", "bits": 8, "group_size": 64, "from_the_future": {"a": 1}}
    config = AutoQuantizationConfig.from_dict(data)
    assert isinstance(config, GraceConfig) and config.bits == 8 and config.group_size == 64
    written = json.loads(config.to_json_string(use_diff=False))
    assert written["from_the_future"] == {"a": 1} and written["quant_method"] == "grace"
    assert GraceConfig.from_dict(written).to_dict() == config.to_dict()


@pytest.mark.parametrize("switch", ["decode_attention", "deferred_stop_check", "fast_generate"])
def test_inference_switches_default_on_and_survive_the_round_trip(switch):
    assert getattr(GraceConfig(), switch) is True
    written = json.loads(GraceConfig(**{switch: False}).to_json_string(use_diff=False))
    assert written[switch] is False
    assert getattr(AutoQuantizationConfig.from_dict(written), switch) is False
    assert getattr(GraceConfig.from_dict(json.loads(GraceConfig().to_json_string(use_diff=False))), switch) is True


def test_registration_is_idempotent_and_public_names_exist():
    register()
    register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["grace"] is GraceConfig
    assert AUTO_QUANTIZER_MAPPING["grace"] is GraceHfQuantizer
    from transformers import AutoModelForImageTextToText

    assert grace_quant.AutoModelForVision2Seq is AutoModelForImageTextToText
