"""kvserve's HTTP layer: the OpenAI API in front of ``engine.AsyncEngine``."""
