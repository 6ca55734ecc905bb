"""The Gradio chat app. It talks to the engine only through `Engine.generate` (ppd_core)."""
