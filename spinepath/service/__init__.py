"""The hospital side (issue 15): a warm worker fed by the PACS through a persistent queue on disk."""
