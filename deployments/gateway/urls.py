"""Absolute URLs for answers: the request's own base (a Serve route prefix included)."""

from __future__ import annotations

from fastapi import Request


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def absolute(url: str, request: Request) -> str:
    """Local-storage URLs are relative (``/files/...``) unless a public base URL is configured."""
    return base_url(request) + url if url.startswith("/") else url
