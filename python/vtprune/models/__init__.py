"""Model integrations: one adapter per family, registered in :data:`FAMILIES` (docs/integration.md)."""

# The one table of supported families: transformers' model class name -> "module:adapter class". Adding a family
# means one adapter module (and its tiny-model builder for the tests) and one entry here.
FAMILIES = {
    "LlavaForConditionalGeneration": "vtprune.models.llava:LlavaPatch",
    "LlavaNextForConditionalGeneration": "vtprune.models.llava_next:LlavaNextPatch",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.models.qwen2_5_vl:Qwen2_5_VLPatch",
    "Qwen3VLForConditionalGeneration": "vtprune.models.qwen3_vl:Qwen3VLPatch",
}
