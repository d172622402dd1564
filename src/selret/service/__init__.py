"""The HTTP search service and its web page, over one :class:`selret.search.engine.SearchEngine`."""
