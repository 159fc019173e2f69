"""The registry of model families, keyed by `config.architectures` and `model_type`."""

from typing import Any

from localmoe.errors import LocalMoEError
from localmoe.models import (
    afmoe,
    aria_text,
    axk1,
    axk2,
    bailing_hybrid,
    beam,
    cohere2_moe,
    dbrx,
    deepseek_v2,
    deepseek_v3,
    deepseek_v4,
    deepseek_v32,
    dots1,
    dots3_note,
    ernie4_5_moe,
    ernie4_5_vl_moe,
    exaone_moe,
    flex_olmo,
    flint,
    gemma4,
    glm4_moe,
    glm4_moe_lite,
    glm4v_moe,
    glm5_next,
    glm_moe_dsa,
    gpt_oss,
    granitemoe,
    granitemoe_swa,
    granitemoehybrid,
    granitemoeshared,
    hunyuan_v1_moe,
    hy_v3,
    hy_v4,
    hy_v4_vl,
    inkling,
    inkling2,
    inkling2_loop,
    jamba,
    jetmoe,
    kimi_linear,
    kolibri1,
    laguna,
    lara_mini,
    lfm2_moe,
    llama4,
    longcat_flash,
    mellum,
    mimo_v2_flash,
    minimax,
    minimax_m2,
    minimax_m3_vl,
    mistral4,
    mistral_large4,
    mixtral,
    muse_spark,
    nemotron_h,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
    qwen3_omni_moe,
    qwen3_vl_moe,
    qwen4_exp,
    sarvam_moe,
    solar_open,
    step3p7,
    zaya,
)
from localmoe.models.family import Family
from localmoe.tables import render

FAMILIES: tuple[Family, ...] = (
    mixtral.FAMILY,
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    olmoe.FAMILY,
    deepseek_v2.FAMILY,
    deepseek_v3.FAMILY,
    glm4_moe.FAMILY,
    gpt_oss.FAMILY,
    phimoe.FAMILY,
    minimax.FAMILY,
    minimax_m2.FAMILY,
    ernie4_5_moe.FAMILY,
    hunyuan_v1_moe.FAMILY,
    llama4.FAMILY,
    qwen3_5_moe.FAMILY,
    gemma4.FAMILY,
    mellum.FAMILY,
    mistral4.FAMILY,
    glm_moe_dsa.FAMILY,
    deepseek_v4.FAMILY,
    qwen3_next.FAMILY,
    qwen3_vl_moe.FAMILY,
    glm4_moe_lite.FAMILY,
    nemotron_h.FAMILY,
    granitemoehybrid.FAMILY,
    lfm2_moe.FAMILY,
    kimi_linear.FAMILY,
    laguna.FAMILY,
    afmoe.FAMILY,
    dots1.FAMILY,
    solar_open.FAMILY,
    exaone_moe.FAMILY,
    hy_v3.FAMILY,
    sarvam_moe.FAMILY,
    deepseek_v32.FAMILY,
    cohere2_moe.FAMILY,
    glm4v_moe.FAMILY,
    mimo_v2_flash.FAMILY,
    step3p7.FAMILY,
    minimax_m3_vl.FAMILY,
    zaya.FAMILY,
    bailing_hybrid.FAMILY,
    granitemoe.FAMILY,
    granitemoeshared.FAMILY,
    granitemoe_swa.FAMILY,
    flex_olmo.FAMILY,
    dbrx.FAMILY,
    qwen3_omni_moe.FAMILY,
    jamba.FAMILY,
    aria_text.FAMILY,
    jetmoe.FAMILY,
    ernie4_5_vl_moe.FAMILY,
    axk1.FAMILY,
    flint.FAMILY,
    hy_v4.FAMILY,
    hy_v4_vl.FAMILY,
    lara_mini.FAMILY,
    mistral_large4.FAMILY,
    longcat_flash.FAMILY,
    kolibri1.FAMILY,
    beam.FAMILY,
    axk2.FAMILY,
    muse_spark.FAMILY,
    glm5_next.FAMILY,
    inkling.FAMILY,
    inkling2.FAMILY,
    inkling2_loop.FAMILY,
    dots3_note.FAMILY,
    qwen4_exp.FAMILY,
)


def family_for(config: dict[str, Any]) -> Family:
    """The family for a config: by its architecture, or by `model_type` when it names none.

    transformers saves some families under the class it runs them with (Sarvam's as
    Glm4MoeForCausalLM): there the model_type, naming a family of its own, decides. Code shipped with a
    checkpoint (`auto_map`) is never run: a config that needs it for an architecture localmoe does not
    have built in is refused.
    """
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    own_type = next((family for family in FAMILIES if family.model_type == model_type), None)
    for family in FAMILIES:
        if architectures and architectures[0] in family.architectures and own_type is not None:
            return own_type
        if architectures and architectures[0] in family.architectures + family.wrapper_architectures:
            return family
        if not architectures and model_type == family.model_type:
            return family
    name = architectures[0] if architectures else f"model_type {model_type!r}"
    supported = ", ".join(a for family in FAMILIES for a in family.architectures + family.wrapper_architectures)
    if config.get("auto_map"):
        raise LocalMoEError(
            f"{name} needs code shipped with the checkpoint (auto_map), and localmoe never runs checkpoint code; "
            f"built-in architectures: {supported}"
        )
    raise LocalMoEError(f"unsupported architecture {name} (model_type {model_type!r}); localmoe runs: {supported}")


def families_table(markdown: bool = False) -> str:
    """The supported families as a table; in Markdown, as README.md embeds it (a test keeps the two equal)."""
    code = "`{}`".format if markdown else str
    rows = [[_architectures(f, code), code(f.model_type), code(f.example)] for f in FAMILIES]
    return render(["architecture", code("model_type"), "example Hub id"], rows, markdown)


def _architectures(family: Family, code) -> str:
    names = [code(a) for a in family.architectures[:1]]
    names += [f"{code(a)} (text only)" for a in family.wrapper_architectures]
    return ", ".join(names)
