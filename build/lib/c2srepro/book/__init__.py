"""The book on top of the library: the chapter runner, the stages chapters hand each other, provenance,
the browser check, the scorecard, and the smoke and paper profiles' fixtures.

Nothing in the library imports this package.
"""
