"""The pass itself: contract, static shapes, numerics of the exported programs, torch.compile."""

import pytest
import torch

from ertacache.errors import UserError
from ertacache.export.graphs import CACHED_STEP, FULL_STEP, VAE_DECODE, BakeStepGraphs
from ertacache.sampling.steps import CachedStep, FullStep
from tests.export.conftest import LATENT, TEXT


@pytest.fixture(scope="module")
def graphs(tiny):
    return BakeStepGraphs(batch_size=1, dtype=torch.float32, text_shape=TEXT, decoder=tiny.decoder)(
        tiny.adapter, tiny.profile)


def test_contract_names_shapes_and_dtypes(graphs):
    full, cached, dec = (graphs.specs[n] for n in (FULL_STEP, CACHED_STEP, VAE_DECODE))
    assert full.input_names == ["latents", "step", "text_embeds", "guidance_scale"]
    assert full.output_names == ["latents_out", "residual_out"]
    assert cached.input_names == ["latents", "step", "text_embeds", "guidance_scale", "residual"]
    assert cached.output_names == ["latents_out"]
    shapes = {s.name: (s.shape, s.dtype) for s in cached.inputs}
    assert shapes["latents"] == ((1, *LATENT), "float32")
    assert shapes["step"] == ((), "int64") and shapes["guidance_scale"] == ((), "float32")
    assert shapes["text_embeds"] == ((2, *TEXT), "float32")  # cond and uncond rows
    tokens = LATENT[1] * (LATENT[2] // 2) * (LATENT[3] // 2)  # patch (1, 2, 2)
    assert shapes["residual"] == ((2, tokens, 24), "float32") == (full.outputs[1].shape, full.outputs[1].dtype)
    assert dec.outputs[0].shape == (1, 2, 8, 8, 3) and dec.outputs[0].dtype == "uint8"


def test_the_pass_reuses_the_step_modules_and_bakes_the_tables(graphs, tiny):
    assert type(graphs.modules[FULL_STEP]) is FullStep and type(graphs.modules[CACHED_STEP]) is CachedStep
    torch.testing.assert_close(graphs.tables.sigmas, torch.tensor(tiny.profile.sigmas, dtype=torch.float32))
    consts = {k: v for k, v in graphs.programs[CACHED_STEP].state_dict.items() if k.startswith("tables.")}
    # every table is a buffer of the program; with the reuse predictor (K = 1) pred_w/pred_b are not read, and the
    # ONNX graph has no trace of them (tests/runtime/test_predictor.py)
    assert set(consts) == {"tables.sigmas", "tables.corr_a", "tables.corr_b", "tables.pred_w", "tables.pred_b"}
    assert graphs.mask == tiny.profile.mask  # the mask is runtime data, not part of any graph


def test_exported_programs_are_static(graphs):
    for name, program in graphs.programs.items():
        for node in program.graph.nodes:
            if node.op == "placeholder" and "val" in node.meta:
                assert all(isinstance(d, int) for d in node.meta["val"].shape), (name, node.name)


def test_exported_programs_match_eager_at_every_step(graphs, tiny):
    latents, _, text, g = graphs.example_inputs[FULL_STEP]
    full_ep, cached_ep = graphs.programs[FULL_STEP].module(), graphs.programs[CACHED_STEP].module()
    with torch.no_grad():
        for i in range(tiny.profile.steps):
            step = torch.tensor(i)
            ref_x, ref_r = graphs.modules[FULL_STEP](latents, step, text, g)
            got_x, got_r = full_ep(latents, step, text, g)
            torch.testing.assert_close(got_x, ref_x, rtol=0, atol=1e-6)
            torch.testing.assert_close(got_r, ref_r, rtol=0, atol=1e-6)
            ref = graphs.modules[CACHED_STEP](latents, step, text, g, ref_r)
            torch.testing.assert_close(cached_ep(latents, step, text, g, ref_r), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [FULL_STEP, CACHED_STEP])
def test_torch_compile_fullgraph_has_no_graph_break(graphs, name):
    module, inputs = graphs.modules[name], graphs.example_inputs[name]
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(module)(*inputs)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(module, fullgraph=True, backend="eager")  # dynamo only: Inductor costs ~40 s
        got, ref = compiled(*inputs), module(*inputs)
    torch._dynamo.reset()
    for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_preconditions_are_checked(tiny):
    bake = BakeStepGraphs(1, torch.float32, TEXT)
    tiny.model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            bake(tiny.adapter, tiny.profile)
    finally:
        tiny.model.eval()
    with pytest.raises(UserError, match="batch-size"):
        BakeStepGraphs(0, torch.float32, TEXT)


def test_the_graphs_record_the_family_conditioning_and_want_a_shape_per_tensor(graphs, tiny, monkeypatch):
    import dataclasses

    import ertacache.models.family as family_mod
    from ertacache.models.family import ConditioningInput
    from ertacache.models.wan import WAN_T2V

    assert graphs.conditioning == ("text_embeds",) and graphs.rewrites == ("wan_stack_rope",)
    two = dataclasses.replace(WAN_T2V, conditioning=(*WAN_T2V.conditioning, ConditioningInput("pooled", rows="sample")))
    monkeypatch.setattr(family_mod, "_FAMILIES", {**family_mod._FAMILIES, "wan": two})
    with pytest.raises(UserError, match="conditioning inputs \\['text_embeds', 'pooled'\\]; give the export one shape"):
        BakeStepGraphs(1, torch.float32, TEXT)(tiny.adapter, tiny.profile)
