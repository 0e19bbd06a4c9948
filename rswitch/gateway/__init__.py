"""The request pipeline: resolve, route, render, call, stream, record. No web framework here."""
