"""``kiln bench``: sampler x scheduler x steps x precision x backend studies of one workflow."""
