"""Integrations of purelm with other engines. Each lives in its own subpackage behind an optional
extra, imported only when asked for:

- `purelm.integrations.ray` (pip install 'purelm[ray]'): Ray Serve replicas of purelm's OpenAI server
  with prefix-aware routing, and a Ray Data processor for batch inference. See docs/ray.md."""
