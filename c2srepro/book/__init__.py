"""The book on top of the library: the chapter runner, the stages chapters hand each other,
provenance, table display, the paper's published numbers, the scorecard, the browser check, and the
smoke and paper profiles' fixtures.

Nothing in the library imports this package.
"""
