"""Where models live: the catalog of known models, the store on disk, and downloads into it."""
