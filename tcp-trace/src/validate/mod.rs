pub mod netns;
pub mod rawtcp;
