//! Labeled text data sets: loaders, splits, partitioning across clients.
