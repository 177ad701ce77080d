import pytest

from vllm_heterocache.config import DEFAULT_COMPRESSION_RATIO, HeteroCacheConfig
from vllm_heterocache.errors import ConfigError


def test_defaults():
    cfg = HeteroCacheConfig()
    assert cfg.compression_ratio == DEFAULT_COMPRESSION_RATIO
    assert cfg.token_budget is None and cfg.window == 32 and cfg.drift_interval == 5 and cfg.refill


def test_frozen():
    with pytest.raises(AttributeError):
        HeteroCacheConfig().window = 3


def test_from_additional_config():
    cfg = HeteroCacheConfig.from_additional_config(
        {"heterocache": {"compression_ratio": 0.25, "window": 16, "refill": False}, "other_plugin": {}}
    )
    assert (cfg.compression_ratio, cfg.window, cfg.refill) == (0.25, 16, False)
    assert HeteroCacheConfig.from_additional_config(None) == HeteroCacheConfig()
    assert HeteroCacheConfig.from_additional_config({"other": 1}) == HeteroCacheConfig()
    assert HeteroCacheConfig.from_dict(HeteroCacheConfig(token_budget=64).to_dict()).token_budget == 64


def test_int_ratio_accepted_as_float():
    assert HeteroCacheConfig(compression_ratio=1).compression_ratio == 1.0


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"compresion_ratio": 0.2}, "heterocache.compresion_ratio"),
        ({"compression_ratio": 0.0}, "heterocache.compression_ratio must be in (0, 1]"),
        ({"compression_ratio": 1.5}, "heterocache.compression_ratio"),
        ({"compression_ratio": "0.5"}, "heterocache.compression_ratio must be float or int"),
        ({"compression_ratio": 0.5, "token_budget": 10}, "exclusive"),
        ({"token_budget": 0}, "heterocache.token_budget"),
        ({"token_budget": True}, "heterocache.token_budget must be int"),
        ({"window": -1}, "heterocache.window"),
        ({"drift_interval": 0}, "heterocache.drift_interval"),
        ({"pool_kernel": 4}, "heterocache.pool_kernel must be odd"),
        ({"stability_threshold": 2}, "heterocache.stability_threshold"),
        ({"refill": "yes"}, "heterocache.refill must be bool"),
        ({"profile": 3}, "heterocache.profile must be str"),
        ({"host_tier_gib": 0}, "heterocache.host_tier_gib must be a positive number"),
        ({"host_tier_gib": "1"}, "heterocache.host_tier_gib must be float or int"),
        ({"host_tier_path": 1}, "heterocache.host_tier_path must be str"),
        ({"window": 80000}, "heterocache.window must be at most 8192, got 80000: the window's queries"),
        ({"drift_interval": 5000}, "heterocache.drift_interval must be at most 256"),
        ({"pool_kernel": 1001}, "heterocache.pool_kernel must be at most 255"),
        ({"budget_classes": 40}, "heterocache.budget_classes must be at most 16"),
        ({"host_tier_gib": 1e6}, "heterocache.host_tier_gib must be at most 4096"),
    ],
)
def test_bad_options_name_the_option(options, needle):
    with pytest.raises(ConfigError) as e:
        HeteroCacheConfig.from_additional_config({"heterocache": options})
    assert needle in str(e.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid options: .*compression_ratio"):
        HeteroCacheConfig.from_dict({"nope": 1})


def test_not_an_object():
    with pytest.raises(ConfigError, match="additional_config.heterocache must be a JSON object"):
        HeteroCacheConfig.from_additional_config({"heterocache": []})


def test_the_limits_themselves_are_accepted():
    from vllm_heterocache.config import LIMITS

    HeteroCacheConfig(**{name: limit for name, (limit, _) in LIMITS.items()})
