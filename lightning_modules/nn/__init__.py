"""Pure torch components: no Lightning, no YAML. See docs/architecture.md."""
